"""Store-side semantics of applying a translated message: merges (ADT^A40, A41, A47) and what
an update keeps of the record it replaces.

A merge message's Bundle says it in FHIR terms: the record merged away (from MRG) is
linked `replaced-by` the survivor (from PID), or, for a type without `link` (an Account,
ADT^A41), named `historical` by a Linkage whose `source` is the survivor. Written as they
stand, its entries would overwrite the merged-away record with the MRG fragment and leave
every reference where it was; instead that entry becomes a store `Merge` run in the same
transaction (see `gateway.store.fhir.Merge`), and the Bundle's own links to it are left to
the merge.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gateway.fhir.escaping import token
from gateway.fhir.search import SearchRegistry
from gateway.fhir.transaction import condition
from gateway.mapping.tables import MergeRow, merge_kind
from gateway.store.fhir import Merge, WriteRequest


def merge_writes(registry: SearchRegistry, writes: list[WriteRequest],
                 rule: MergeRow) -> tuple[list[WriteRequest], list[Merge]]:
    """The writes of a merge message without the merged-away records' entries, and the
    merges that replace them. A record merged away without an identifier to find it by
    stays as the Bundle wrote it."""
    urls = {w.full_url for w in writes if w.full_url}
    linked = _linkage_pairs(writes, urls)
    kind = merge_kind(rule.resource) or "link"
    merges: list[Merge] = []
    gone: dict[str, WriteRequest] = {}
    for write in writes:
        survivor = _replaced_by(write, rule.resource, urls)
        if survivor is None and write.resource_type == rule.resource and write.full_url:
            survivor = linked.get(write.full_url)
        identifiers = _identifiers(write) if survivor is not None else []
        if survivor is None or not identifiers or write.full_url is None:
            continue
        values = ",".join(token(system, value) for system, value in identifiers)
        source = condition(registry, rule.resource, [("identifier", values)])
        retired = tuple(identifiers) if rule.identifiers == "dropped" else ()
        merges.append(Merge(rule.resource, source, survivor, retired, kind))
        gone[write.full_url] = write
    if not gone:
        return writes, []
    kept = [_without_links_to(w, gone) for w in writes if w.full_url not in gone]
    return kept, merges


def keep_merge_state(current: dict[str, Any], update: dict[str, Any]) -> None:
    """A Carry for every write a message makes: an update from v2 replaces the record, yet
    must not undo what only the store knows or what the message does not say.

    - `link` (a merge's replaces/replaced-by) is kept when the message sends none;
    - identifiers are kept: a message naming the record by one of them (a result sent
      under the MRN a merge retired, now the survivor's `use: old`) must not take the
      others away; an identifier leaves a record only by a merge or an A47;
    - a status the message does not convey (`unknown`: an A08, or a result's PV1) does not
      overwrite a known one (v2-to-FHIR Event[EncounterStatus], A08: "the transaction
      does not convey the status").
    """
    if "link" in current and "link" not in update:
        update["link"] = current["link"]
    held = {(i.get("system"), i.get("value")) for i in update.get("identifier", [])}
    kept = [i for i in current.get("identifier", [])
            if (i.get("system"), i.get("value")) not in held]
    if kept:
        update["identifier"] = update.get("identifier", []) + kept
    if update.get("status") == "unknown" and current.get("status") not in (None, "unknown"):
        update["status"] = current["status"]


def _replaced_by(write: WriteRequest, resource_type: str, urls: set[str]) -> str | None:
    """The fullUrl of the entry this one's `replaced-by` link names, if it is one of the
    call's entries."""
    if write.resource_type != resource_type or write.resource is None:
        return None
    for link in write.resource.get("link", []):
        other = link.get("other", {}).get("reference")
        if link.get("type") == "replaced-by" and other in urls:
            return str(other)
    return None


def _linkage_pairs(writes: list[WriteRequest], urls: set[str]) -> dict[str, str]:
    """fullUrl of each entry a Linkage of the call names `historical` -> the fullUrl of
    its `source`: how a merge of a type without `link` (an Account, ADT^A41) is said."""
    pairs: dict[str, str] = {}
    for write in writes:
        if write.resource_type != "Linkage" or write.resource is None:
            continue
        items = [(i.get("type"), i.get("resource", {}).get("reference"))
                 for i in write.resource.get("item", [])]
        sources = [ref for kind, ref in items if kind == "source" and ref in urls]
        if len(sources) != 1:
            continue
        for kind, ref in items:
            if kind == "historical" and ref in urls:
                pairs[str(ref)] = sources[0]
    return pairs


def _identifiers(write: WriteRequest) -> list[tuple[str, str]]:
    assert write.resource is not None
    return [(str(i.get("system", "")), str(i["value"]))
            for i in write.resource.get("identifier", []) if i.get("value")]


def _without_links_to(write: WriteRequest, gone: dict[str, WriteRequest]) -> WriteRequest:
    """The write without references to entries no longer written: the survivor's
    `replaces` link (the merge writes it, to the record it finds) and the Provenance's
    target; a Linkage's item names the merged-away record by its identifier instead (the
    record the merge finds keeps it only as the survivor's `use: old`)."""
    resource = write.resource
    if resource is None:
        return write
    changed = dict(resource)
    if write.resource_type == "Linkage" and "item" in changed:
        changed["item"] = [_by_identifier(item, gone) for item in changed["item"]]
    if "link" in changed:
        changed["link"] = [link for link in changed["link"]
                           if link.get("other", {}).get("reference") not in gone]
        if not changed["link"]:
            del changed["link"]
    if "target" in changed and isinstance(changed["target"], list):
        changed["target"] = [t for t in changed["target"] if t.get("reference") not in gone]
    return replace(write, resource=changed) if changed != resource else write


def _by_identifier(item: dict[str, Any], gone: dict[str, WriteRequest]) -> dict[str, Any]:
    """A Linkage item whose reference is an entry no longer written, as a logical
    reference: the type and first identifier of that entry."""
    write = gone.get(item.get("resource", {}).get("reference", ""))
    if write is None:
        return item
    system, value = _identifiers(write)[0]
    identifier = {"system": system, "value": value} if system else {"value": value}
    return {**item, "resource": {"type": write.resource_type, "identifier": identifier}}
