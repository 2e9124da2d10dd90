"""Merges applied inside a FHIR transaction on the writer thread (ADT^A40/A41/A47, `isthmus
fhir merge`): the records merged away are kept, inactive, `replaced-by` the survivor;
references to them move to the survivor; their identifiers move with them.

References are found through the reference index (every search parameter of type
reference: Encounter.subject, Observation.subject, RelatedPerson.patient ...), so a merge
reads only the resources that point at the record, never the whole store. Provenance keeps
what it recorded: history is not rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Protocol

from gateway.store.fhir import Merge, MergeOutcome, SearchQuery, StoredResource, WriteConflict


class _Rows(Protocol):
    def fetchall(self) -> list[Any]: ...


class _Connection(Protocol):
    """sqlite3's connection, or PostgreSQL's bridge (`writes.WriterConnection`)."""

    def execute(self, sql: str, parameters: Sequence[Any], /) -> _Rows: ...


class TransactionWriter(Protocol):
    """What a merge needs of the writer it runs in (`writes.TransactionWriter`)."""

    @property
    def db(self) -> _Connection: ...

    def current_rows(self, keys: Sequence[tuple[str, str]]
                     ) -> dict[tuple[str, str], StoredResource]: ...

    def rewrite(self, resource_type: str, id: str, document: dict[str, Any],
                current: StoredResource) -> None: ...

    def find(self, query: SearchQuery, limit: int) -> list[StoredResource]: ...

# More records than this for one identifier is not a merge a message can ask for.
_MAX_SOURCES = 20
_HISTORY_TYPES = frozenset({"Provenance", "AuditEvent"})


def apply_merge(writer: TransactionWriter, merge: Merge,
                targets: Mapping[str, str]) -> MergeOutcome:
    """Merge what `merge.source` finds into the survivor; raises WriteConflict (404) when
    the survivor does not exist."""
    resource_type = merge.resource_type
    target_ref = targets.get(merge.target) or f"{resource_type}/{merge.target}"
    target_type, _, target_id = target_ref.partition("/")
    if target_type != resource_type:
        raise WriteConflict(400, f"merge: the survivor is not a {resource_type}", -1)
    if _current(writer, resource_type, target_id) is None:
        raise WriteConflict(404, f"merge: the surviving {resource_type} does not exist", -1)
    sources = [found for found in writer.find(merge.source, _MAX_SOURCES)
               if found.id != target_id]
    merged: list[str] = []
    moved_identifiers: list[dict[str, Any]] = []
    moved = 0
    for source in sources:
        source_ref = f"{resource_type}/{source.id}"
        moved += _move_references(writer, source_ref, target_ref,
                                  skip=(resource_type, target_id))
        body = _load(source.body)
        for identifier in body.pop("identifier", []):
            if (identifier.get("system", ""), identifier.get("value", "")) not in merge.retired:
                moved_identifiers.append({**identifier, "use": "old"})
        _retire(body, merge.kept, target_ref)
        writer.rewrite(resource_type, source.id, body, source)
        merged.append(source_ref)
    if merged:
        _update_survivor(writer, resource_type, target_id,
                         merged if merge.kept == "link" else [], moved_identifiers)
    return MergeOutcome(target_ref, tuple(merged), moved)


def _retire(body: dict[str, Any], kept: str, target_ref: str) -> None:
    """Mark a merged-away record: Patient has `active` and `link` (replaced-by the
    survivor); a type without them (Account) says it by `status` inactive."""
    if kept == "status":
        body["status"] = "inactive"
        return
    body["active"] = False
    body["link"] = [link for link in body.get("link", [])
                    if link.get("type") != "replaced-by"] + [
        {"other": {"reference": target_ref}, "type": "replaced-by"}]


def _update_survivor(writer: TransactionWriter, resource_type: str, target_id: str,
                     merged: list[str], identifiers: list[dict[str, Any]]) -> None:
    """The survivor `replaces` each record in `merged` and holds the identifiers."""
    current = _current(writer, resource_type, target_id)
    assert current is not None
    body = _load(current.body)
    held = {(i.get("system", ""), i.get("value", "")) for i in body.get("identifier", [])}
    for identifier in identifiers:
        key = (identifier.get("system", ""), identifier.get("value", ""))
        if key not in held:
            held.add(key)
            body.setdefault("identifier", []).append(identifier)
    if merged:
        links = body.setdefault("link", [])
        for source_ref in merged:
            link = {"other": {"reference": source_ref}, "type": "replaces"}
            if link not in links:
                links.append(link)
    writer.rewrite(resource_type, target_id, body, current)


def _move_references(writer: TransactionWriter, source_ref: str, target_ref: str,
                     skip: tuple[str, str]) -> int:
    """Point every current resource that refers to `source_ref` at `target_ref`; how many
    resources changed."""
    rows = writer.db.execute(
        "SELECT DISTINCT r.type, r.id FROM fhir_reference x "
        "JOIN fhir_resource r ON r.rid = x.rid WHERE x.target = ?", (source_ref,)
    ).fetchall()
    moved = 0
    for resource_type, id_ in rows:
        if resource_type in _HISTORY_TYPES or (resource_type, id_) == skip:
            continue
        current = _current(writer, resource_type, id_)
        if current is None:
            continue
        body = _load(current.body)
        if _replace_reference(body, source_ref, target_ref):
            writer.rewrite(resource_type, id_, body, current)
            moved += 1
    return moved


def _replace_reference(node: Any, old: str, new: str) -> bool:
    changed = False
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and value == old:
                node[key] = new
                changed = True
            elif isinstance(value, dict | list):
                changed = _replace_reference(value, old, new) or changed
    elif isinstance(node, list):
        for item in node:
            changed = _replace_reference(item, old, new) or changed
    return changed


def _current(writer: TransactionWriter, resource_type: str, id_: str) -> StoredResource | None:
    found = writer.current_rows([(resource_type, id_)]).get((resource_type, id_))
    return None if found is None or found.deleted else found


def _load(body: bytes) -> dict[str, Any]:
    """A stored body as a dict, its decimals kept as written (1.50 stays 1.50)."""
    document: dict[str, Any] = json.loads(body, parse_float=Decimal)
    return document
