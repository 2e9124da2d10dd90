"""A remote backend's Bundle as the caller gets it (a search's searchset, an operation's
answer): every entry checked again in memory (compartment, scope constraints; a backend
that ignores a parameter cannot widen an answer), cut by the profile and `_elements`,
on our base; and its paging links as cursors. The backend's continuation (Cerner's
`-pageContext`, Epic's session) stays opaque: our link carries a cursor sealed for this
client (`policy.cursors`) that maps back to the backend's URL, so an agent pages to the
end through our links and never sees, forges or widens the backend's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from gateway.edge.fhir_api import Call, Pairs
from gateway.edge.fhir_proxy_backend import BackendLink, Json, as_list
from gateway.fhir.outcome import FhirError
from gateway.policy.errors import CursorRefused
from gateway.store.fhir import Match

CURSOR = "_cursor"
# Parameters a paging link may carry beside its cursor (they change only the format).
_BESIDE_CURSOR = frozenset({CURSOR, "_format", "_pretty"})


@dataclass(frozen=True, slots=True)
class Page:
    """A paging link followed: the backend's URL (relative to its base), the caller's
    original parameters, and the operation it pages through ("" for a search)."""

    relative: str
    params: Pairs
    operation: str = ""
    level: str = ""


@dataclass(frozen=True, slots=True)
class Visibility:
    """What a caller may see of one resource type in a Bundle answer."""

    allowed: bool
    patient: str | None = None
    clauses: tuple[tuple[Match, ...], ...] = ()
    trusted: bool = False  # the constraint went to the backend: what it cannot judge passes


def opened(link: BackendLink, call: Call, params: Pairs) -> Page | None:
    """The page a request's cursor names; None without one. 400 for a cursor that is
    forged, another client's, expired, or for another backend or type."""
    cursors = [value for name, value in params if name == CURSOR]
    if not cursors:
        return None
    if len(cursors) > 1 or any(name not in _BESIDE_CURSOR for name, _ in params):
        raise FhirError(400, f"a paging link carries {CURSOR} alone", CURSOR)
    if link.cursors is None:
        raise FhirError(400, "this paging link is not one of this gateway's", CURSOR)
    try:
        content = link.cursors.open(call.principal.client_id, cursors[0])
    except CursorRefused as exc:
        raise FhirError(400, exc.reason, CURSOR) from None
    relative, saved = content.get("u"), content.get("p")
    if (content.get("b") != link.name or content.get("t") != call.resource_type
            or not isinstance(relative, str) or not isinstance(saved, list)):
        raise FhirError(400, "this paging link belongs to another search", CURSOR)
    params = [(str(pair[0]), str(pair[1])) for pair in saved
              if isinstance(pair, list) and len(pair) == 2]
    return Page(relative, params, str(content.get("o", "")), str(content.get("l", "")))


def answer_bundle(link: BackendLink, call: Call, bundle: Json, *, params: Pairs,
                  elements: Sequence[str] | None, trusted: bool,
                  operation: tuple[str, str] = ("", "")
                  ) -> tuple[Json, list[Json], bool]:
    """The caller's Bundle, the matches it shows, and whether a match was held back.
    `params`: the caller's own, kept in the cursors of the paging links; `operation`:
    its name and level when the Bundle answers one."""
    api, type_ = call.api, call.resource_type
    base = api.base(call.request)
    entries: list[Json] = []
    matches: list[Json] = []
    hidden = False
    seen_types = {type_: visibility(call, type_, trusted=trusted)}
    for raw in as_list(bundle.get("entry")):
        entry = _entry(call, raw, base, elements, seen_types)
        mode = _mode(raw)
        if entry is None:
            hidden = hidden or mode == "match"
            continue
        entries.append(entry)
        if mode == "match":
            matches.append(entry["resource"])
    kind = bundle.get("type") if isinstance(bundle.get("type"), str) else "searchset"
    answer: Json = {"resourceType": "Bundle", "type": kind}
    total = bundle.get("total")
    if isinstance(total, int) and not hidden:
        answer["total"] = total  # a total counting what was held back would tell
    links = [found for found in (_link(link, call, raw, base, params, operation)
                                 for raw in as_list(bundle.get("link"))) if found is not None]
    if links:
        answer["link"] = links
    if entries:
        answer["entry"] = entries
    return answer, matches, hidden


def visibility(call: Call, type_: str, trusted: bool = False) -> Visibility:
    api, principal = call.api, call.principal
    if type_ not in api.types:
        return Visibility(False)
    try:
        api.authorize(principal, "search", type_)
        clauses = api.scope_clauses(principal, "search", type_)
    except FhirError:
        return Visibility(False)
    return Visibility(True, api.confined_to(principal, type_), clauses, trusted)


def _entry(call: Call, raw: Any, base: str, elements: Sequence[str] | None,
           seen_types: dict[str, Visibility]) -> Json | None:
    """One entry of the backend's Bundle as the caller may see it; None: held back."""
    if not isinstance(raw, dict) or not isinstance(raw.get("resource"), dict):
        return None
    resource: Json = raw["resource"]
    type_ = resource.get("resourceType")
    if not isinstance(type_, str):
        return None
    mode = _mode(raw)
    if type_ == "OperationOutcome" and mode == "outcome":
        return {"resource": resource, "search": {"mode": "outcome"}}
    seen = seen_types.get(type_)
    if seen is None:
        seen = seen_types[type_] = visibility(call, type_)
    if not seen.allowed:
        return None
    api = call.api
    if seen.patient is not None and not api.in_compartment(type_, resource, seen.patient):
        return None
    if seen.clauses:
        verdict = api.registry.matches(type_, resource, seen.clauses)
        if verdict is False or (verdict is None and not seen.trusted):
            return None
    cut = elements if mode == "match" else None
    entry: Json = {"resource": api.shaped_resource(call.principal, resource, cut),
                   "search": {"mode": mode}}
    id_ = resource.get("id")
    if isinstance(id_, str) and id_:
        entry = {"fullUrl": f"{base}/{type_}/{id_}", **entry}
    return entry


def _link(link: BackendLink, call: Call, raw: Any, base: str, params: Pairs,
          operation: tuple[str, str]) -> Json | None:
    """A paging link as a cursor on our base; one to a host that is not the backend's is
    dropped (and counted)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
        return None
    relation = str(raw.get("relation", ""))
    relative = link.relative(raw["url"])
    if relative is None:
        link.dropped(relation)
        return None
    if link.cursors is None:
        url = link.ours(raw["url"], base)
        return None if url is None else {"relation": relation, "url": url}
    cursor = link.cursors.seal(call.principal.client_id, {
        "b": link.name, "t": call.resource_type, "u": relative,
        "p": [list(pair) for pair in params], "o": operation[0], "l": operation[1]})
    url = f"{base}/{call.resource_type}?{urlencode([(CURSOR, cursor)])}"
    return {"relation": relation, "url": url}


def _mode(entry: Any) -> str:
    search = entry.get("search") if isinstance(entry, dict) else None
    mode = search.get("mode") if isinstance(search, dict) else None
    return mode if mode in ("match", "include", "outcome") else "match"
