"""Writes to the embedded FHIR store, on its writer thread: one FHIR transaction's entries
checked, resolved against the current rows (conditions, If-Match, If-None-Exist), given
new versions and index rows, and written in as few statements as possible.

Runs inside the savepoint the store opened for it; a WriteConflict rolls back the caller's
writes only. Decimals keep their digits from the caller's resource to the stored body.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

import orjson

from gateway.store.errors import AmbiguousMatch
from gateway.store.fhir import (
    IndexEntry,
    Indexer,
    Merge,
    MergeOutcome,
    SearchQuery,
    StoredResource,
    StringIndex,
    TokenMatch,
    WriteConflict,
    WriteOutcome,
    WriteRequest,
)
from gateway.store.fhir_sqlite.blinding import (
    NO_GROUPS,
    StringLabels,
    blind_query,
    index_rows,
    shared_labels,
)
from gateway.store.fhir_sqlite.merge import apply_merge
from gateway.store.fhir_sqlite.schema import (
    INDEX_INSERTS,
    RECORD_LABELS,
    UPSERT,
    format_instant,
    parse_instant,
    stored_resource,
)
from gateway.store.fhir_sqlite.sql import current_rows_sql, select_sql, token_condition_sql
from gateway.store.sealing import PLAIN, RowCodec, fhir_context

# FHIR R4 http.html#trules: DELETE, then POST, then PUT.
_METHOD_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2}
# FHIR R4 datatypes.html#id.
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_ONE_MICROSECOND = timedelta(microseconds=1)
_MAX_KEYS_PER_STATEMENT = 400
# One slot per write: its outcome or (a write not applied atomically) its conflict.
Outcomes = list[WriteOutcome | WriteConflict]


@dataclass(slots=True, eq=False)
class _Entry:
    """One write being resolved: its final id, the version there now, and its outcome."""

    position: int  # index in the caller's list, named in conflicts
    request: WriteRequest
    resource: dict[str, Any] | None  # the caller's resource, copied (references rewritten)
    id: str | None = None
    current: StoredResource | None = None
    outcome: WriteOutcome | None = None
    # A POST whose If-None-Exist repeats an earlier create in the same call: it is that one.
    same_as: _Entry | None = None
    index: list[IndexEntry] = field(default_factory=list)
    # A carry still to run (`_carry_unless_same`) on the resource before rewriting.
    carry_due: bool = False
    unrewritten: dict[str, Any] | None = None
    _current_document: dict[str, Any] | None = None

    def current_document(self) -> dict[str, Any]:
        """The current version's body parsed (once: carry and the same-content check both
        read it); the caller may keep parts of it, not change them."""
        if self._current_document is None:
            assert self.current is not None
            self._current_document = _loads(self.current.body, self.current.last_updated)
        return self._current_document

    @property
    def key(self) -> tuple[str, str]:
        assert self.id is not None
        return (self.request.resource_type, self.id)


class Rows(Protocol):
    def fetchall(self) -> list[Any]: ...


class WriterConnection(Protocol):
    """What the writer needs of its connection: sqlite3's, or PostgreSQL's through
    gateway.store.pg.fhir (which runs the same statements in its dialect)."""

    def execute(self, sql: str, parameters: Sequence[Any], /) -> Rows: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> object: ...


class TransactionWriter:
    """Writer thread only: resolves and writes FHIR transactions on the writer connection,
    inside the transaction (and savepoint) the store opened."""

    def __init__(self, db: WriterConnection, indexer: Indexer, last_stamp: datetime,
                 codec: RowCodec = PLAIN, labels: StringLabels = NO_GROUPS) -> None:
        self._db = db
        self._codec = codec
        self._labels = labels
        self._indexer = indexer
        self._last_stamp = last_stamp
        self._last_text = format_instant(last_stamp)

    @property
    def db(self) -> WriterConnection:
        return self._db

    def current_rows(self, keys: Sequence[tuple[str, str]]
                     ) -> dict[tuple[str, str], StoredResource]:
        return self._current_rows(keys)

    def find(self, query: SearchQuery, limit: int) -> list[StoredResource]:
        """Current resources a search finds (blinded and opened as the store seals them)."""
        return self._found(query, limit)

    def rewrite(self, resource_type: str, id: str, document: dict[str, Any],
                current: StoredResource) -> None:
        """A new version of a current resource with this content (a merge's changes);
        none if the content is the same."""
        request = WriteRequest("PUT", resource_type, id, document)
        self._write([_Entry(-1, request, document, id, current)])

    def apply(self, writes: Sequence[WriteRequest], first: int, merges: Sequence[Merge] = (),
              merged: list[MergeOutcome] | None = None) -> list[WriteOutcome]:
        """Resolve and write entries as one FHIR transaction, then its merges (their
        outcomes appended to `merged`); the caller's savepoint makes it atomic. `first` is
        the position of writes[0] in the caller's list."""
        entries = [_prepare(first + i, write) for i, write in enumerate(writes)]
        ordered = sorted(entries, key=lambda e: _METHOD_ORDER[e.request.method])
        claimed: dict[tuple[str, str], int] = {}
        current = self._current_rows([
            (e.request.resource_type, target) for e in entries
            if (target := e.request.id or (e.resource or {}).get("id")
                or e.request.create_id)])

        deletes = [e for e in ordered if e.request.method == "DELETE"]
        for entry in deletes:
            self._resolve_delete(entry, current)
            _claim(entry, claimed)
        self._write([e for e in deletes if e.outcome is None])

        upserts = [e for e in ordered if e.request.method != "DELETE"]
        created: dict[SearchQuery, _Entry] = {}
        for entry in upserts:
            self._resolve_upsert(entry, current, created)
            _claim(entry, claimed)

        # FHIR R4 http.html#trules: references to an entry's fullUrl become its final id.
        targets = {e.request.full_url: f"{e.request.resource_type}/{e.id}"
                   for e in entries if e.request.full_url and e.id is not None}
        writing = [e for e in upserts if e.outcome is None and e.same_as is None]
        for entry in writing:
            entry.unrewritten = entry.resource
        if targets:
            for entry in writing:  # a matched If-None-Exist writes nothing: left as it is
                entry.resource = _rewritten(entry.resource, targets)
        for entry in writing:
            if entry.carry_due:
                _carry_unless_same(entry, targets)
        self._write([e for e in writing if e.outcome is None])
        for merge in merges:
            outcome = apply_merge(self, merge, targets)
            if merged is not None:
                merged.append(outcome)

        outcomes: list[WriteOutcome] = []
        for entry in entries:
            if entry.same_as is not None:
                assert entry.same_as.outcome is not None
                entry.outcome = WriteOutcome(200, entry.same_as.outcome.stored, changed=False)
            assert entry.outcome is not None
            outcomes.append(entry.outcome)
        return outcomes

    def _resolve_delete(self, entry: _Entry,
                              current: Mapping[tuple[str, str], StoredResource]) -> None:
        request = entry.request
        if request.condition is not None:
            matches = self._matches(entry)
            if not matches:
                _check_replaced(entry)
                entry.outcome = WriteOutcome(204, None, changed=False)
                return
            entry.id, entry.current = matches[0].id, matches[0]
        else:
            assert request.id is not None
            entry.id = request.id
            entry.current = current.get(entry.key)
        _check_replaced(entry)
        _check_if_match(entry)
        if entry.current is None or entry.current.deleted:
            entry.outcome = WriteOutcome(204, None, changed=False)

    def _resolve_upsert(self, entry: _Entry,
                              current: Mapping[tuple[str, str], StoredResource],
                              created: dict[SearchQuery, _Entry]) -> None:
        request = entry.request
        assert entry.resource is not None
        given: str | None = entry.resource.get("id")
        if request.condition is not None:
            matches = self._matches(entry)
            if matches and request.method == "POST":  # If-None-Exist found it: no write
                entry.id = matches[0].id
                entry.outcome = WriteOutcome(200, matches[0], changed=False)
                return
            if matches:
                if given is not None and given != matches[0].id:
                    raise WriteConflict(400, f"entry {entry.position}: the resource id does "
                                        "not match the resource the condition found",
                                        entry.position)
                entry.id, entry.current = matches[0].id, matches[0]
                _check_replaced(entry)
                _check_if_match(entry)
                _due_carry(entry)
                return
            if request.method == "POST":
                if request.condition in created:
                    entry.same_as = created[request.condition]
                    entry.id = entry.same_as.id
                    return
                created[request.condition] = entry
        entry.id = request.id or given or request.create_id or str(uuid.uuid4())
        entry.current = current.get(entry.key)
        if request.method == "POST" and entry.current is not None and not entry.current.deleted:
            raise WriteConflict(409, f"entry {entry.position}: a resource with this id "
                                "already exists", entry.position)
        if request.method == "PUT":
            _check_replaced(entry)
            _due_carry(entry)
        _check_if_match(entry)

    def _matches(self, entry: _Entry) -> list[StoredResource]:
        """The (at most two) resources an entry's condition finds; 412 if several."""
        assert entry.request.condition is not None
        query = entry.request.condition
        if query.resource_type != entry.request.resource_type:
            raise WriteConflict(400, f"entry {entry.position}: the condition searches "
                                "another resource type", entry.position)
        rows = self._found(query, 2)
        if len(rows) > 1:
            rule = "If-None-Exist" if entry.request.method == "POST" else "the condition"
            raise AmbiguousMatch(412, f"entry {entry.position}: {rule} matches more than one "
                                 "resource", entry.position)
        return rows

    def _found(self, query: SearchQuery, limit: int) -> list[StoredResource]:
        """Up to `limit` current resources a search finds, unordered; on a sealed store
        long starts-with values are checked before the limit (see blinding)."""
        token = query.clauses[0][0] if len(query.clauses) == 1 and query.clauses[0] else None
        if isinstance(token, TokenMatch) and token.code is not None:
            # An identifier (a conditional write): blinded as `blind_query` blinds it, and
            # nothing to check again after the SQL.
            made = token_condition_sql(query, self._codec.blind(token.code, "token"), limit)
            if made is not None:
                return [stored_resource(row, self._codec)
                        for row in self._db.execute(*made).fetchall()]
        blinded = blind_query(query, self._codec, self._labels)
        sql, params = select_sql(blinded.query, None if blinded.rechecks else limit, 0,
                                 ordered=False, labels=blinded.labels)
        found = [stored_resource(row, self._codec)
                 for row in self._db.execute(sql, params).fetchall()]
        return blinded.recheck(found, self._indexer)[:limit]

    def _current_rows(
        self, keys: Sequence[tuple[str, str]],
    ) -> dict[tuple[str, str], StoredResource]:
        """The current rows for several (type, id) keys, read on the writer (so inside
        this transaction) in as few statements as possible."""
        found: dict[tuple[str, str], StoredResource] = {}
        by_type: dict[str, list[str]] = {}
        for resource_type, id_ in dict.fromkeys(keys):
            by_type.setdefault(resource_type, []).append(id_)
        # Every type's ids in one statement, up to the statement's share of bound values
        # (a message names 5-6 types: one statement each was 6 of its 9 reads).
        parts: list[tuple[str, list[str]]] = []
        for resource_type, ids in by_type.items():
            for start in range(0, len(ids), _MAX_KEYS_PER_STATEMENT):
                parts.append((resource_type, ids[start:start + _MAX_KEYS_PER_STATEMENT]))
        while parts:
            taken, bound = 0, 0
            while taken < len(parts) and (
                    taken == 0 or bound + len(parts[taken][1]) <= _MAX_KEYS_PER_STATEMENT):
                bound += len(parts[taken][1])
                taken += 1
            statement, parts = parts[:taken], parts[taken:]
            values: list[str] = []
            for resource_type, ids in statement:
                values.append(resource_type)
                values.extend(ids)
            sql = current_rows_sql([len(ids) for _, ids in statement])
            for row in self._db.execute(sql, values).fetchall():
                stored = stored_resource(row, self._codec)
                found[(stored.resource_type, stored.id)] = stored
        return found

    def _write(self, entries: Sequence[_Entry]) -> None:
        """Give each entry its new version (or find it unchanged) and write them all."""
        rows: list[tuple[object, ...]] = []
        rows_of: dict[type[IndexEntry], list[tuple[object, ...]]] = {}
        for entry in entries:
            stored = self._next_version(entry)
            if stored is None:
                continue
            rows.append((stored.resource_type, stored.id, stored.version, stored.last_updated,
                         int(stored.deleted), self._codec.seal(stored.body, fhir_context(
                             stored.resource_type, stored.id, stored.version))))
            for kind, values in index_rows(stored.resource_type, stored.id, entry.index,
                                           self._codec, self._labels).items():
                rows_of.setdefault(kind, []).extend(values)
        if not rows:
            return
        # The triggers archive each row as a version and drop the old index rows first.
        self._db.executemany(UPSERT, rows)
        for kind, values in rows_of.items():
            self._db.executemany(INDEX_INSERTS[kind], values)
        # Only a sealed store shares rows (PostgreSQL's writer, this class too, never does).
        if self._codec.sealed and StringIndex in rows_of:
            self._db.executemany(RECORD_LABELS, shared_labels(rows_of[StringIndex]))

    def _next_version(self, entry: _Entry) -> StoredResource | None:
        """The version this entry writes, its outcome set; None if its content is unchanged."""
        resource_type = entry.request.resource_type
        assert entry.id is not None
        current = entry.current
        live = current is not None and not current.deleted
        if entry.request.method == "DELETE":
            assert current is not None
            stamp = self._stamp(current.last_updated)
            stored = StoredResource(resource_type, entry.id, current.version + 1, stamp, True,
                                    b"")
            entry.outcome = WriteOutcome(204, None)
            return stored
        assert entry.resource is not None
        document = _document(resource_type, entry.id, entry.resource)
        if current is not None and live and _same_content(entry, document):
            # A resent message: same content, so no new version (FHIR R4 allows this).
            entry.outcome = WriteOutcome(200, current, changed=False)
            return None
        version = current.version + 1 if current is not None else 1
        stamp = self._stamp(current.last_updated if current is not None else None)
        meta = document["meta"]
        document["meta"] = {"versionId": str(version), "lastUpdated": stamp, **meta}
        try:
            body = orjson.dumps(document, default=_decimal)
        except TypeError:
            raise WriteConflict(400, f"entry {entry.position}: the resource is not JSON",
                                entry.position) from None
        entry.index = list(dict.fromkeys(self._indexer(resource_type, document)))
        stored = StoredResource(resource_type, entry.id, version, stamp, False, body)
        entry.outcome = WriteOutcome(200 if live else 201, stored)
        return stored

    def _stamp(self, after: str | None) -> str:
        """Now, as a FHIR instant later than any given before and than `after`."""
        floor = self._last_stamp
        # Stamps this writer wrote are fixed-width UTC text, so text order is time order:
        # one no later than the last given needs no parsing (nearly every one).
        if after is not None and not (len(after) == len(self._last_text)
                                      and after[-1] == "Z" and after <= self._last_text):
            floor = max(floor, parse_instant(after))
        now = datetime.now(UTC)
        if now <= floor:
            now = floor + _ONE_MICROSECOND
        self._last_stamp = now
        self._last_text = format_instant(now)
        return self._last_text


# -- writes: pure helpers -------------------------------------------------------------------


def _prepare(position: int, request: WriteRequest) -> _Entry:
    """Check an entry's shape and copy its resource (the caller's dict is never changed;
    a value that is not JSON is refused when the version is serialised)."""
    def bad(reason: str) -> WriteConflict:
        return WriteConflict(400, f"entry {position}: {reason}", position)

    if request.method not in _METHOD_ORDER:
        raise bad("the method is not POST, PUT or DELETE")
    if request.id is not None and not _ID.fullmatch(request.id):
        raise bad("the id is not a valid FHIR id")
    if request.method == "DELETE":
        if (request.id is None) == (request.condition is None):
            raise bad("a delete needs either an id or a condition")
        return _Entry(position, request, None)
    if request.method == "PUT" and (request.id is None) == (request.condition is None):
        raise bad("an update needs either an id or a condition")
    if not isinstance(request.resource, dict):
        raise bad(f"{request.method} needs a resource")
    # A shallow copy: the writer sets only top-level keys, and rewrites references into
    # new containers (`_rewritten`), so the caller's nested values are shared, never
    # changed. (A deep copy of every resource was ~10 % of the apply.)
    resource = dict(request.resource)
    if resource.setdefault("resourceType", request.resource_type) != request.resource_type:
        raise bad("the resourceType does not match the request")
    given = resource.get("id")
    if given is not None and (not isinstance(given, str) or not _ID.fullmatch(given)):
        raise bad("the resource id is not a valid FHIR id")
    if request.method == "PUT" and request.id is not None and given not in (None, request.id):
        raise bad("the resource id does not match the request id")
    if not isinstance(resource.get("meta", {}), dict):
        raise bad("meta is not an object")
    return _Entry(position, request, resource)


def _claim(entry: _Entry, claimed: dict[tuple[str, str], int]) -> None:
    """FHIR R4 http.html#trules: two entries resolving to one resource fail the transaction
    (a matched If-None-Exist only reads, so it claims nothing)."""
    if entry.id is None or entry.same_as is not None or (
            entry.request.method == "POST" and entry.outcome is not None):
        return
    other = claimed.setdefault(entry.key, entry.position)
    if other != entry.position:
        raise WriteConflict(400, f"entry {entry.position}: resolves to the same resource as "
                            f"entry {other}", entry.position)


def _check_replaced(entry: _Entry) -> None:
    """The caller's check of what this PUT or DELETE replaces, before If-Match (a 412
    would tell a refused caller the version of something it may not see)."""
    check = entry.request.check
    refusal = check(entry.current) if check is not None else None
    if refusal is not None:
        status, reason = refusal
        raise WriteConflict(status, f"entry {entry.position}: {reason}", entry.position)


def _due_carry(entry: _Entry) -> None:
    """Whether the update keeps something of the version it replaces (the caller's Carry):
    run once references are rewritten, by `_carry_unless_same`."""
    carry, current = entry.request.carry, entry.current
    entry.carry_due = carry is not None and current is not None and not current.deleted


def _carry_unless_same(entry: _Entry, targets: Mapping[str, str]) -> None:
    """The update's carry (given the resource as resolved, its references then rewritten
    again); none when the rewritten resource already says what the current version says
    (a resend, a ward every admission names): a Carry keeps what an update lacks of the
    version, nothing then, and the body's parse was ~5 % of the writer thread."""
    carry, current = entry.request.carry, entry.current
    assert carry is not None and current is not None and entry.id is not None
    assert entry.resource is not None and entry.unrewritten is not None
    document = _document(entry.request.resource_type, entry.id, entry.resource)
    if _same_bytes(current, document):
        entry.outcome = WriteOutcome(200, current, changed=False)
        return
    carry(entry.current_document(), entry.unrewritten)
    entry.resource = _rewritten(entry.unrewritten, targets) if targets else entry.unrewritten


def _check_if_match(entry: _Entry) -> None:
    expected = entry.request.if_match
    if expected is None:
        return
    current = entry.current
    if current is None or current.deleted:
        raise WriteConflict(412, f"entry {entry.position}: If-Match version {expected} but "
                            "the resource does not exist", entry.position)
    if current.version != expected:
        raise WriteConflict(412, f"entry {entry.position}: If-Match version {expected} does "
                            f"not match current version {current.version}", entry.position)


def _document(resource_type: str, id: str, resource: Mapping[str, Any]) -> dict[str, Any]:
    """The resource as it will be served: resourceType, id and meta first; meta without
    versionId and lastUpdated (the store sets those)."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items()
            if k not in ("versionId", "lastUpdated")}
    document: dict[str, Any] = {"resourceType": resource_type, "id": id, "meta": meta}
    document.update((k, v) for k, v in resource.items()
                    if k not in ("resourceType", "id", "meta"))
    return document


def _same_content(entry: _Entry, document: Mapping[str, Any]) -> bool:
    """Whether the current version says what `document` says (store meta aside). Decimals
    are compared as written ("1.50" against Decimal('1.50')), not as floats: 0.1 the float
    is not 0.100 the FHIR decimal."""
    current = entry.current
    assert current is not None
    same = _same_bytes(current, document)
    if same is None:
        return False  # not JSON: refused when serialised for its new version
    return same or _content(entry.current_document()) == _content(document)


def _same_bytes(current: StoredResource, document: Mapping[str, Any]) -> bool | None:
    """Whether `document` serialises to the version's stored bytes given its meta (a resend
    does; other bytes may still be the same content in another key order); None: not JSON."""
    meta = {"versionId": str(current.version), "lastUpdated": current.last_updated,
            **document["meta"]}
    try:
        return orjson.dumps({**document, "meta": meta}, default=_decimal) == current.body
    except TypeError:
        return None


def _loads(body: bytes, last_updated: str = "") -> Any:
    """A stored body, its decimals as Decimal (as gateway.fhir.jsonio reads JSON).
    `last_updated`: the version's meta.lastUpdated, which the body holds and which alone
    would send it to the slower parser."""
    probe = body.replace(last_updated.encode(), b"", 1) if last_updated else body
    if not _may_hold_decimal(probe):
        return orjson.loads(body)
    return json.loads(body, parse_float=Decimal)


def _may_hold_decimal(body: bytes) -> bool:
    """Whether the body may hold a number a float would not keep: a digit then a fraction
    or exponent, whose digits (and sign) follow what precedes a JSON value. In an id or
    reference ("...-589e-9694...") they follow a letter: no number there."""
    for found in _FLOATISH.finditer(body):
        start = found.start()
        while start > 0 and body[start - 1] in _NUMBER_BYTES:
            start -= 1
        if start == 0 or body[start - 1] in _BEFORE_VALUE:
            return True
    return False


# A digit then a fraction or exponent. Every meta.lastUpdated holds one ("...:00.123456Z"):
# it is taken out before the search (a copy of the bytes, <1 us), and a match inside an id
# is told from a number by what precedes its digits, so nearly every body takes orjson
# (~5 against ~15-50 us). A pattern that finds a number where a value stands in one search
# (as gateway.fhir.jsonio has) costs Python's re more (11-23 us a 500-byte body) than the
# parser it saves.
_NUMBER_BYTES = frozenset(b"0123456789-")
_BEFORE_VALUE = frozenset(b":,[ \t\r\n")
_FLOATISH = re.compile(rb"[0-9](?:\.[0-9]|[eE][-+]?[0-9])")


def _content(document: Mapping[str, Any]) -> dict[str, Any]:
    """What a version says, apart from the store's versionId and lastUpdated."""
    content = dict(document)
    meta = {k: v for k, v in (content.pop("meta", None) or {}).items()
            if k not in ("versionId", "lastUpdated")}
    if meta:
        content["meta"] = meta
    return content


_CONTAINERS = (dict, list)  # a tuple: isinstance with `dict | list` is slower in 3.11


def _rewritten(node: Any, targets: Mapping[str, str]) -> Any:
    """`node` with its references to `targets` replaced: new dicts and lists only along
    the paths that change, the others shared (the caller's are never changed)."""
    if isinstance(node, dict):
        changed: dict[str, Any] | None = None
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                new = targets.get(value, value)
            elif isinstance(value, _CONTAINERS):
                new = _rewritten(value, targets)
            else:
                continue
            if new is not value:
                if changed is None:
                    changed = dict(node)
                changed[key] = new
        return node if changed is None else changed
    if isinstance(node, list):
        copied: list[Any] | None = None
        for position, item in enumerate(node):
            if isinstance(item, _CONTAINERS):
                new = _rewritten(item, targets)
                if new is not item:
                    if copied is None:
                        copied = list(node)
                    copied[position] = new
        return node if copied is None else copied
    return node


def _decimal(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value).encode())
    raise TypeError(type(value).__name__)
