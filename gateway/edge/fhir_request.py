"""Reading one FHIR request and recording it: who calls (the `Call`), the body, the search
parameters, the conditional headers, the compartment and profile checks on a search, the
access record, and the shapes of an answer. Shared by the local store's answers and the
facade's, so both refuse and record alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from email.utils import format_datetime
from functools import lru_cache
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web
from multidict import MultiDict
from opentelemetry import trace

from gateway.audit.record import Action, AuditRecord
from gateway.edge.auth import principal_for
from gateway.edge.fhir_api import FHIR, Call, FhirApi
from gateway.fhir.guard import BodyError, check_and_parse, validate_incoming
from gateway.fhir.outcome import FHIR_JSON, FhirError
from gateway.fhir.search import ParsedSearch, SearchError, UnsupportedFormat
from gateway.fhir.transaction import parse_etag
from gateway.fhir.validate import InvalidResource
from gateway.policy.principal import Principal
from gateway.store.fhir import SearchQuery, StoredResource
from gateway.telemetry import set_attributes

_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
           403: "Forbidden", 404: "Not Found", 409: "Conflict", 410: "Gone",
           412: "Precondition Failed", 422: "Unprocessable Entity"}
ACTIONS = {"POST": Action.CREATE, "PUT": Action.UPDATE, "DELETE": Action.DELETE}
INTERACTIONS = {"POST": "create", "PUT": "update", "DELETE": "delete"}


# -- the call ---------------------------------------------------------------------------------


async def call_for(request: web.Request, interaction: str, resource_type: str = "") -> Call:
    """The caller, authenticated, throttled and checked against the type, before anything
    else is read."""
    api = request.app[FHIR]
    check_format(request)
    principal = await principal_for(request)
    api.throttle(principal)
    if resource_type:
        api.check_type(resource_type)
    if api.telemetry.recording:
        set_attributes(trace.get_current_span(), {
            "fhir.interaction": interaction, "fhir.resource_type": resource_type,
            "fhir.client_id": principal.client_id})
    return Call(api, request, principal, interaction, resource_type)


def served_here(api: FhirApi, resource_type: str, interaction: str) -> None:
    """Bundles are answered by the local store: an entry for a type a backend serves is
    refused (the facade proxies single requests)."""
    backend = api.facade.served_by(resource_type, interaction) if api.facade else None
    if backend is not None:
        raise FhirError(400, f"{resource_type} is served by backend {backend}; send "
                        "it on its own, not in a Bundle", code="not-supported")


def check_format(request: web.Request) -> None:
    """JSON only: XML (by _format, Accept or Content-Type) answers 415."""
    wanted = request.query.get("_format", "") if "_format" in request.query_string else ""
    accept = request.headers.get("Accept", "")
    if "xml" in wanted or ("xml" in accept and "json" not in accept):
        raise FhirError(415, "only JSON is supported (application/fhir+json)")


def access(call: Call, action: Action, outcome: str = "success", *,
           resource_type: str | None = None, resource_id: str | None = None,
           patient: str | None = None, query: str | None = None,
           query_shape: str = "") -> AuditRecord:
    """The audit record of this call's access (who, what, whose, why, the trace)."""
    principal = call.principal
    profile = principal.profile or ""
    trace_id = ""
    if call.api.telemetry.recording:  # no span is made otherwise: nothing to look up
        span = trace.get_current_span().get_span_context()
        trace_id = format(span.trace_id, "032x") if span.is_valid else ""
    return AuditRecord(
        action=action, outcome=outcome, client_id=principal.client_id,
        peer=call.request.remote or "",
        resource_type=resource_type if resource_type is not None else call.resource_type,
        resource_id=resource_id, patient=patient, query=query, query_shape=query_shape,
        purpose=profile, profile=profile, control_id=call.request.headers.get(
            "X-Request-Id", "")[:64],
        trace_id=trace_id)


def search_access(call: Call, params: Sequence[tuple[str, str]], parsed: ParsedSearch,
                  patient: str | None) -> AuditRecord:
    return access(call, Action.SEARCH, query=urlencode(list(params)),
                  query_shape=parsed.shape, patient=patient)


def unknown(resource_type: str) -> FhirError:
    return FhirError(404, f"no {resource_type} with this id is known")


# -- headers and the body -----------------------------------------------------------------------


def prefer_return(request: web.Request) -> str:
    prefer = request.headers.get("Prefer", "")
    for part in prefer.split(","):
        name, _, value = part.strip().partition("=")
        if name.strip() == "return":
            return value.strip().strip('"')
    return "representation"


def lenient(request: web.Request) -> bool:
    """Whether unknown search parameters are ignored: `Prefer: handling=...` when the
    request says, else fhir.search_handling (FHIR's default, and ours, is lenient)."""
    for part in request.headers.get("Prefer", "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip() == "handling":
            return value.strip().strip('"') != "strict"
    return request.app[FHIR].limits.search_handling != "strict"


def if_match(request: web.Request) -> int | None:
    value = request.headers.get("If-Match")
    return parse_etag(value, "If-Match") if value else None


async def read_body(request: web.Request, limit: int) -> dict[str, Any]:
    """The JSON body, refused by size before it is read and by shape before it is parsed."""
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if "xml" in ctype:
        raise FhirError(415, "only JSON is supported (application/fhir+json)")
    if ctype and ctype not in _JSON_TYPES:
        raise FhirError(415, "send application/fhir+json")
    if request.content_length is not None and request.content_length > limit:
        raise FhirError(413, f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise FhirError(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    api = request.app[FHIR]
    try:
        return check_and_parse(b"".join(chunks), max_bytes=limit,
                               max_depth=api.limits.max_depth,
                               max_array_items=api.limits.max_array_items)
    except BodyError as exc:
        raise FhirError(exc.status, exc.reason) from None


def validated(resource: dict[str, Any], resource_type: str, where: str = "") -> None:
    """400 naming the element when the resource does not meet the R4 model or a value rule
    of the base spec (R4 http.html: 400 for "failed basic FHIR validation rules"; 422 is
    for profiles and business rules)."""
    try:
        validate_incoming(resource, resource_type)
    except BodyError as exc:
        raise FhirError(exc.status, exc.reason) from None
    except InvalidResource as exc:
        path = f"{exc.resource_type}.{exc.path}" if exc.path else exc.resource_type
        expression = f"{where}.{path}" if where else path
        raise FhirError(400, f"{expression}: {exc.reason}", expression,
                        code=exc.code) from None


# -- search parameters ----------------------------------------------------------------------


def search_params(request: web.Request, form: MultiDict[str] | None = None
                  ) -> list[tuple[str, str]]:
    params = list(request.query.items())
    if form is not None:
        params.extend(form.items())
    return params


def parse_search(api: FhirApi, type_: str, params: list[tuple[str, str]],
                 lenient: bool) -> ParsedSearch:
    try:
        return api.registry.parse(type_, params, default_count=api.limits.default_count,
                                  max_count=api.limits.max_count, lenient=lenient)
    except UnsupportedFormat:
        raise FhirError(415, "only JSON is supported (application/fhir+json)") from None
    except SearchError as exc:
        raise FhirError(400, str(exc), exc.param) from None


def elements_param(call: Call) -> list[str] | None:
    """_elements on a read, checked and expanded as a search does it (a choice element
    such as `effective` keeps effectiveDateTime); checked before anything is read."""
    request = call.request
    # Most reads carry no query at all: not parsing one is the cheap answer.
    raw = request.query.get("_elements") if request.query_string else None
    if not raw:
        return None
    parsed = parse_search(call.api, call.resource_type, [("_elements", raw)], lenient=False)
    return list(parsed.elements or ())


def check_profile_search(api: FhirApi, principal: Principal, type_: str,
                         parsed: ParsedSearch) -> None:
    """A task profile refuses a search on anything it may not see."""
    profile = api.profile(principal)
    if profile is None:
        return
    for param in sorted(parsed.params):
        if param in ("_id", "_lastUpdated"):
            continue
        if not profile.permits_search(type_, api.registry.element_roots(type_, param)):
            raise FhirError(403, f"search parameter {param} is outside the task profile "
                            f"'{profile.name}'", param)


def check_include_targets(api: FhirApi, principal: Principal, parsed: ParsedSearch) -> None:
    """Every type an _include or _revinclude could bring in must be one the caller may
    search: refused up front, so the answer does not depend on whether anything matched."""
    for include in parsed.includes:
        definition = api.registry.params(include.source_type).get(include.param)
        targets = ((include.target_type,) if include.target_type
                   else definition.targets if definition is not None else ())
        for target in targets:
            if target in api.types:
                api.authorize(principal, "search", target)
    for include in parsed.revincludes:
        api.authorize(principal, "search", include.source_type)


def confined(call: Call, type_: str, query: SearchQuery) -> SearchQuery:
    """The query cut to the caller's patient compartment and scope constraints."""
    api = call.api
    clauses = list(query.clauses)
    clauses.extend(api.scope_clauses(call.principal, "search", type_))
    patient = api.confined_to(call.principal, type_)
    if patient is not None:
        clauses.append(api.compartment_clause(type_, patient))
    return SearchQuery(type_, tuple(clauses), query.sort, query.count, query.offset)


# -- answers --------------------------------------------------------------------------------


def resource_answer(stored: StoredResource, body: bytes, status: int = 200,
                    location: str | None = None) -> web.Response:
    headers = {"ETag": f'W/"{stored.version}"',
               "Last-Modified": http_date(stored.last_updated)}
    if location:
        headers["Location"] = location
    return web.Response(body=body, status=status, headers=headers,
                        content_type=FHIR_JSON)


@lru_cache(maxsize=4096)
def http_date(instant: str) -> str:
    """Last-Modified from a stored instant (cached: reads of one version repeat it)."""
    return format_datetime(datetime.fromisoformat(instant.replace("Z", "+00:00")),
                           usegmt=True)


def paging_links(request: web.Request, base: str, offset: int, count: int,
                 total: int | None, has_more: bool | None = None, *,
                 search: tuple[str, Sequence[tuple[str, str]]] | None = None
                 ) -> list[tuple[str, str]]:
    """Paging links. `search` (type, parameters) makes them GET searches of that type:
    a POST _search's form and a batch entry's URL are not in the request's own URL."""
    if search is not None:
        path, query = f"{base}/{search[0]}", search[1]
    else:
        path = base + request.path[len("/fhir"):] if request.path.startswith("/fhir") \
            else base
        query = list(request.query.items())
    params = [(k, v) for k, v in query if k != "_offset"]
    links = [("self", _url(path, params + ([("_offset", str(offset))] if offset else [])))]
    more = has_more if has_more is not None else (total is not None
                                                  and offset + count < total)
    if more and count:
        links.append(("next", _url(path, params + [("_offset", str(offset + count))])))
    if offset and count:
        links.append(("previous", _url(path, params + [
            ("_offset", str(max(0, offset - count)))])))
    return links


def _url(path: str, params: list[tuple[str, str]]) -> str:
    return f"{path}?{urlencode(params)}" if params else path


def bundle(kind: str, entries: Sequence[bytes], links: Sequence[tuple[str, str]],
           total: int | None) -> web.Response:
    """A Bundle whose entries are spliced in as bytes (stored resources are not re-read)."""
    head: dict[str, Any] = {"resourceType": "Bundle", "type": kind}
    if total is not None:
        head["total"] = total
    if links:
        head["link"] = [{"relation": rel, "url": url} for rel, url in links]
    prefix = orjson.dumps(head)[:-1]
    body = prefix + b',"entry":[' + b",".join(entries) + b"]}" if entries else \
        orjson.dumps(head)
    return web.Response(body=body, content_type=FHIR_JSON)
