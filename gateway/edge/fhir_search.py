"""Searches answered by the local store: the query cut to the caller's compartment and
scope constraints, `_include`/`_revinclude` targets each checked like a search of their
own, the stored bytes spliced into the Bundle, the access recorded before it leaves."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from aiohttp import web

from gateway.edge.fhir_api import Call, FhirApi
from gateway.edge.fhir_request import (
    bundle,
    check_include_targets,
    check_profile_search,
    confined,
    lenient,
    paging_links,
    parse_search,
    search_access,
)
from gateway.fhir.search import ParsedSearch
from gateway.policy.principal import Principal
from gateway.store.fhir import (
    IdMatch,
    Match,
    ReferenceIndex,
    ReferenceMatch,
    SearchQuery,
    StoredResource,
)


async def search(call: Call, params: list[tuple[str, str]]) -> web.Response:
    """A search by GET, POST _search or a batch entry, on the local store."""
    api, principal, type_ = call.api, call.principal, call.resource_type
    api.authorize(principal, "search", type_)
    parsed = parse_search(api, type_, params, lenient(call.request))
    check_profile_search(api, principal, type_, parsed)
    check_include_targets(api, principal, parsed)
    query = confined(call, type_, parsed.query)
    page_size = query.count if query.count is not None else api.limits.default_count
    if parsed.summary_count:
        total = await api.store.count(query)
        if api.limits.audit_reads != "off":
            await api.record_read([search_access(call, params, parsed, patient=None)])
        return bundle("searchset", [], [], total)
    window = SearchQuery(query.resource_type, query.clauses, query.sort, page_size + 1,
                         query.offset)
    page = await api.store.search(window, total=parsed.total)
    matches = page.resources[:page_size]
    has_more = len(page.resources) > page_size
    base = api.base(call.request)
    entries = [_search_entry(api, principal, base, stored, "match", parsed.elements)
               for stored in matches]
    included = await _includes(call, parsed, matches)
    entries += [_search_entry(api, principal, base, stored, "include", None)
                for stored in included]
    # The self link shows the search as performed: ignored parameters are not in it.
    performed = [(k, v) for k, v in params if k not in parsed.ignored]
    links = paging_links(call.request, base, query.offset, page_size, page.total, has_more,
                         search=(type_, performed))
    patient = api.confined_to(principal, type_)
    if patient is None and type_ == "Patient" and len(matches) == 1:
        patient = f"Patient/{matches[0].id}"
    if api.limits.audit_reads != "off":
        await api.record_read([search_access(call, params, parsed, patient=patient)])
    return bundle("searchset", entries, links, page.total)


def _search_entry(api: FhirApi, principal: Principal, base: str, stored: StoredResource,
                  mode: str, elements: Sequence[str] | None) -> bytes:
    url = f"{base}/{stored.resource_type}/{stored.id}"
    return b"".join((b'{"fullUrl":', orjson.dumps(url), b',"resource":',
                     api.shaped(principal, stored, elements),
                     b',"search":{"mode":"', mode.encode(), b'"}}'))


async def _includes(call: Call, parsed: ParsedSearch,
                    matches: Sequence[StoredResource]) -> list[StoredResource]:
    """_include and _revinclude targets the caller may also see (each checked itself)."""
    if not matches or not (parsed.includes or parsed.revincludes):
        return []
    api = call.api
    found: dict[tuple[str, str], StoredResource] = {}
    seen = {(m.resource_type, m.id) for m in matches}
    parsed_matches = [(m, orjson.loads(m.body)) for m in matches]
    for include in parsed.includes:
        targets: set[str] = set()
        for stored, resource in parsed_matches:
            for entry in api.registry.index(stored.resource_type, resource):
                if isinstance(entry, ReferenceIndex) and entry.param == include.param:
                    targets.add(entry.target)
        for target in sorted(targets):
            type_, _, id_ = target.partition("/")
            if include.target_type and type_ != include.target_type:
                continue
            await _add_visible(call, type_, (IdMatch(id_),), found, seen)
    for include in parsed.revincludes:
        refs = tuple(ReferenceMatch(include.param, f"{m.resource_type}/{m.id}")
                     for m in matches)
        await _add_visible(call, include.source_type, refs, found, seen)
    return list(found.values())


async def _add_visible(call: Call, type_: str, clause: tuple[Match, ...],
                       found: dict[tuple[str, str], StoredResource],
                       seen: set[tuple[str, str]]) -> None:
    api = call.api
    if type_ not in api.types:
        return
    # An included type is checked like a search of its own: scopes, profile, compartment.
    api.authorize(call.principal, "search", type_)
    query = confined(call, type_, SearchQuery(type_, (clause,),
                                              count=api.limits.max_count))
    page = await api.store.search(query)
    for stored in page.resources:
        key = (stored.resource_type, stored.id)
        if key not in seen:
            seen.add(key)
            found[key] = stored
