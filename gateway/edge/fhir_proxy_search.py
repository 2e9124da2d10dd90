"""A search proxied to a remote FHIR backend: parsed with our table (unknown parameters
refused, values never echoed; the vendor's own parameters, declared by its table, sent
on as they came), token values in canonical systems run back to the vendor's, sent on
with the caller's compartment and scope constraint, and the answer checked and cut by
`fhir_proxy_bundle`. A paging link's cursor replays the backend's own continuation."""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from gateway.edge.fhir_api import Call, Pairs
from gateway.edge.fhir_proxy_backend import BackendLink
from gateway.edge.fhir_proxy_bundle import Page, answer_bundle
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

# Search parameters not sent on: we answer JSON ourselves, `_elements` is applied here
# (the compartment and constraint checks need the whole resource) and `_count` is sent
# as the page size we allow.
_KEPT_HERE = frozenset({"_format", "_pretty", "_elements", "_count"})
_SENT_CONTROLS = frozenset({"_id", "_lastUpdated", "_offset", "_sort", "_include",
                            "_revinclude", "_summary", "_total"})
_FORM = "application/x-www-form-urlencoded"


async def search(link: BackendLink, call: Call, params: Pairs,
                 page: Page | None = None) -> web.Response:
    """A search by GET or POST _search (sent on as it came), or the page of one a
    paging link names, answered as a searchset."""
    api, principal, type_ = call.api, call.principal, call.resource_type
    api.authorize(principal, "search", type_)
    if page is not None:
        params = page.params
    vendor, ours = vendor_pairs(link, call, type_, params)
    parsed = parse_search(api, type_, ours, lenient(call.request))
    check_profile_search(api, principal, type_, parsed)
    check_include_targets(api, principal, parsed)
    constraint, sent_on = constraint_pairs(call, "search", type_)
    if parsed.summary_count and not sent_on:
        raise FhirError(403, "the granted scopes' constraints cannot be applied to a "
                        f"count of {type_}; search without _summary=count")
    patient = api.confined_to(principal, type_)
    types = (type_, *_included_types(api.registry, parsed))
    if page is not None:
        # The backend's own continuation, as it sent it; what comes back is checked
        # entry by entry as any answer is.
        response = await link.ask(call, "GET", page.relative, cached=types)
    else:
        query = _outgoing(call, type_, ours, parsed) + vendor + constraint
        if patient is not None:
            query += compartment_pairs(call, type_, patient)
        query = to_vendor(link, call, type_, query)
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
    answer, matches, _ = answer_bundle(link, call, bundle, params=params,
                                       elements=parsed.elements, trusted=sent_on)
    answer["type"] = "searchset"
    subject = patient
    if subject is None and type_ == "Patient" and len(matches) == 1:
        subject = f"Patient/{matches[0].get('id')}"
    if api.limits.audit_reads != "off":
        await api.record_read([search_access(call, params, parsed, patient=subject)])
    return web.Response(body=jsonio.dumps(answer), content_type=FHIR_JSON)


def vendor_pairs(link: BackendLink, call: Call, type_: str, params: Pairs
                 ) -> tuple[Pairs, Pairs]:
    """The parameters the backend's vendor table declares for this type (and FHIR does
    not), sent on as they came; and the rest, which our table judges (strict or lenient
    handling applies to what neither declares)."""
    normalizer = link.normalizer
    if normalizer is None or not normalizer.search_params(type_):
        return [], list(params)
    fhir = call.api.registry.params(type_)
    vendor: Pairs = []
    ours: Pairs = []
    for name, value in params:
        bare = name.partition(":")[0]
        if bare not in fhir and normalizer.declared_param(type_, bare):
            vendor.append((name, value))
        else:
            ours.append((name, value))
    return vendor, ours


def to_vendor(link: BackendLink, call: Call, type_: str, query: Pairs) -> Pairs:
    """Token values in the canonical systems and codes, run back to the vendor's."""
    normalizer = link.normalizer
    if normalizer is None:
        return query
    params = call.api.registry.params(type_)

    def roots(name: str) -> frozenset[str]:
        found = params.get(name)
        return found.roots if found is not None and found.type == "token" else frozenset()

    return normalizer.to_vendor(type_, query, roots)


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
