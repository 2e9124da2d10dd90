"""A search proxied to a remote FHIR backend: parsed with our table (unknown parameters
refused, values never echoed), sent on with the caller's compartment and scope
constraint, and every entry of the answer checked again in memory (a backend that
ignores a parameter cannot widen an answer), cut by the profile and `_elements`, its
URLs on our base."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from gateway.edge.fhir_api import Call, Pairs
from gateway.edge.fhir_proxy_backend import BackendLink, Json, as_list
from gateway.edge.fhir_request import (
    check_include_targets,
    check_profile_search,
    lenient,
    parse_search,
    search_access,
)
from gateway.fhir import jsonio
from gateway.fhir.outcome import FHIR_JSON, FhirError
from gateway.fhir.search import ParsedSearch, SearchRegistry
from gateway.store.fhir import Match

# Search parameters not sent on: we answer JSON ourselves, `_elements` is applied here
# (the compartment and constraint checks need the whole resource) and `_count` is sent
# as the page size we allow.
_KEPT_HERE = frozenset({"_format", "_pretty", "_elements", "_count"})
_SENT_CONTROLS = frozenset({"_id", "_lastUpdated", "_offset", "_sort", "_include",
                            "_revinclude", "_summary", "_total"})
_FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True, slots=True)
class _Visibility:
    """What a caller may see of one resource type in a search answer."""

    allowed: bool
    patient: str | None = None
    clauses: tuple[tuple[Match, ...], ...] = ()
    trusted: bool = False  # the constraint went to the backend: what it cannot judge passes


async def search(link: BackendLink, call: Call, params: Pairs) -> web.Response:
    """A search by GET or POST _search (sent on as it came), answered as a searchset."""
    api, principal, type_ = call.api, call.principal, call.resource_type
    api.authorize(principal, "search", type_)
    parsed = parse_search(api, type_, params, lenient(call.request))
    check_profile_search(api, principal, type_, parsed)
    check_include_targets(api, principal, parsed)
    constraint, sent_on = constraint_pairs(call, "search", type_)
    if parsed.summary_count and not sent_on:
        raise FhirError(403, "the granted scopes' constraints cannot be applied to a "
                        f"count of {type_}; search without _summary=count")
    query = _outgoing(call, type_, params, parsed) + constraint
    patient = api.confined_to(principal, type_)
    if patient is not None:
        query += compartment_pairs(call, type_, patient)
    types = (type_, *_included_types(api.registry, parsed))
    if call.request.method == "POST":
        # A search sent by POST stays a POST: its values stay out of URLs and logs.
        response = await link.ask(call, "POST", f"{type_}/_search", key=query,
                                  body=urlencode(query).encode(),
                                  headers={"Content-Type": _FORM}, idempotent=True,
                                  cached=types)
    else:
        response = await link.ask(call, "GET", type_, query=query, cached=types)
    if response.status != 200:
        raise link.refused(response)
    bundle = link.resource(response, "Bundle")
    base = api.base(call.request)
    entries: list[Json] = []
    matches: list[Json] = []
    hidden = False
    seen_types = {type_: _visibility(call, type_, trusted=sent_on)}
    for raw in as_list(bundle.get("entry")):
        entry = _search_entry(call, raw, base, parsed, seen_types)
        mode = _mode(raw)
        if entry is None:
            hidden = hidden or mode == "match"
            continue
        entries.append(entry)
        if mode == "match":
            matches.append(entry["resource"])
    answer: Json = {"resourceType": "Bundle", "type": "searchset"}
    total = bundle.get("total")
    if isinstance(total, int) and not hidden:
        answer["total"] = total  # a total counting what was held back would tell
    links = [found for found in (_link(link, raw, base) for raw in as_list(bundle.get("link")))
             if found is not None]
    if links:
        answer["link"] = links
    if entries:
        answer["entry"] = entries
    subject = patient
    if subject is None and type_ == "Patient" and len(matches) == 1:
        subject = f"Patient/{matches[0].get('id')}"
    if api.limits.audit_reads != "off":
        await api.record_read([search_access(call, params, parsed, patient=subject)])
    return web.Response(body=jsonio.dumps(answer), content_type=FHIR_JSON)


def _outgoing(call: Call, type_: str, params: Pairs, parsed: ParsedSearch) -> Pairs:
    """The caller's parameters as sent on: those the table knows (lenient handling
    drops the rest here, as the local search ignores them), with our page size."""
    known = call.api.registry.params(type_)
    query: Pairs = []
    for name, value in params:
        bare = name.partition(":")[0]
        if bare in _KEPT_HERE or (bare not in known and bare not in _SENT_CONTROLS):
            continue
        query.append((name, value))
    if not parsed.summary_count and parsed.query.count is not None:
        query.append(("_count", str(parsed.query.count)))
    return query


def compartment_pairs(call: Call, type_: str, patient: str) -> Pairs:
    """The parameter that limits a search to the patient's compartment: `_id` for a
    Patient, else `patient` where the type has it, else its compartment parameter."""
    if type_ == "Patient":
        return [("_id", patient.partition("/")[2])]
    registry = call.api.registry
    param = registry.params(type_).get("patient")
    if param is not None and "Patient" in param.targets:
        return [("patient", patient)]
    compartment = registry.compartment_params(type_)
    return [(compartment[0], patient)] if compartment else []


def constraint_pairs(call: Call, interaction: str, type_: str
                      ) -> tuple[Pairs, bool]:
    """A constrained scope's `?param=value` as search parameters for the backend, and
    whether they could be sent (one alternative, or one parameter's values ORed)."""
    api, principal = call.api, call.principal
    api.scope_clauses(principal, interaction, type_)  # 403 when too complex
    alternatives = principal.scopes.constraints_for(interaction, type_)
    if not alternatives:
        return [], True
    if len(alternatives) == 1:
        return list(alternatives[0]), True
    names = {pair[0] for alternative in alternatives for pair in alternative}
    if len(names) == 1 and all(len(a) == 1 for a in alternatives):
        return [(names.pop(), ",".join(a[0][1] for a in alternatives))], True
    return [], False


def _visibility(call: Call, type_: str, trusted: bool = False) -> _Visibility:
    api, principal = call.api, call.principal
    if type_ not in api.types:
        return _Visibility(False)
    try:
        api.authorize(principal, "search", type_)
        clauses = api.scope_clauses(principal, "search", type_)
    except FhirError:
        return _Visibility(False)
    return _Visibility(True, api.confined_to(principal, type_), clauses, trusted)


def _search_entry(call: Call, raw: Any, base: str, parsed: ParsedSearch,
                  seen_types: dict[str, _Visibility]) -> Json | None:
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
        seen = seen_types[type_] = _visibility(call, type_)
    if not seen.allowed:
        return None
    api = call.api
    if seen.patient is not None and not api.in_compartment(type_, resource, seen.patient):
        return None
    if seen.clauses:
        verdict = api.registry.matches(type_, resource, seen.clauses)
        if verdict is False or (verdict is None and not seen.trusted):
            return None
    elements = parsed.elements if mode == "match" else None
    entry: Json = {"resource": api.shaped_resource(call.principal, resource, elements),
                   "search": {"mode": mode}}
    id_ = resource.get("id")
    if isinstance(id_, str) and id_:
        entry = {"fullUrl": f"{base}/{type_}/{id_}", **entry}
    return entry


def _link(link: BackendLink, raw: Any, base: str) -> Json | None:
    """A paging link on our base; one elsewhere (not the backend's) is dropped."""
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
        return None
    url = link.ours(raw["url"], base)
    return None if url is None else {"relation": raw.get("relation", ""), "url": url}


def _included_types(registry: SearchRegistry, parsed: ParsedSearch) -> list[str]:
    """The types an _include or _revinclude may bring into the answer (cache keys)."""
    types: list[str] = []
    for include in parsed.includes:
        definition = registry.params(include.source_type).get(include.param)
        if include.target_type:
            types.append(include.target_type)
        elif definition is not None:
            types.extend(definition.targets)
    types.extend(include.source_type for include in parsed.revincludes)
    return list(dict.fromkeys(types))


def _mode(entry: Any) -> str:
    search = entry.get("search") if isinstance(entry, dict) else None
    mode = search.get("mode") if isinstance(search, dict) else None
    return mode if mode in ("match", "include", "outcome") else "match"
