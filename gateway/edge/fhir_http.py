"""The FHIR R4 REST routes at /fhir: authenticate, authorise, answer from the store.

Every interaction goes the same way: who is calling (SMART token, external token, API
key), whether their scopes allow this interaction on this type, which patient's
compartment confines them, which minimum-necessary profile cuts what they see. Reads serve
the stored JSON bytes as they are; only a profile or `_elements` makes us parse and
re-serialise. Every access is recorded in the audit trail before the answer leaves (fail
closed: 503 if it cannot be recorded). Every refusal is an OperationOutcome, answered in
one place (`errors` and `_refusal`), with no patient data in its text. The checks themselves
(scopes, compartment, profile, audit) live in `fhir_api.FhirApi`. A type routed to a remote
FHIR backend is answered by `fhir_proxy` under the same checks, once the caller is known.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import orjson
from aiohttp import web
from multidict import MultiDict
from opentelemetry import trace

from gateway.audit import Action, AuditRecord
from gateway.edge.auth import AuthError, principal_for
from gateway.edge.fhir_api import FHIR, FhirApi
from gateway.fhir.guard import BodyError, check_and_parse, validate_incoming
from gateway.fhir.outcome import FHIR_JSON, FhirError, information, operation_outcome
from gateway.fhir.outcome import outcome_bytes as _outcome_bytes
from gateway.fhir.search import (
    ParsedSearch,
    SearchError,
    UnsupportedFormat,
    date_range,
)
from gateway.fhir.transaction import (
    Entry,
    parse_bundle,
    parse_etag,
    query_pairs,
    write_request,
)
from gateway.fhir.validate import InvalidResource
from gateway.policy import Principal
from gateway.store import StoreUnavailable
from gateway.store.fhir import (
    HistoryQuery,
    IdMatch,
    Match,
    ReferenceIndex,
    ReferenceMatch,
    SearchQuery,
    StoredResource,
    WriteConflict,
    WriteOutcome,
    WriteRequest,
)
from gateway.telemetry import set_attributes

if TYPE_CHECKING:
    from gateway.edge.fhir_proxy import Remote

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
_REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
            403: "Forbidden", 404: "Not Found", 409: "Conflict", 410: "Gone",
            412: "Precondition Failed", 422: "Unprocessable Entity"}
_ACTIONS = {"POST": Action.CREATE, "PUT": Action.UPDATE, "DELETE": Action.DELETE}


# -- helpers shared by the handlers ----------------------------------------------------------


@dataclass(slots=True)
class _Call:
    """One request's context: the caller, and what the audit records will say."""

    api: FhirApi
    request: web.Request
    principal: Principal
    interaction: str = ""
    resource_type: str = ""


async def _call(request: web.Request, interaction: str, resource_type: str = "") -> _Call:
    api = request.app[FHIR]
    _check_format(request)
    principal = await principal_for(request)
    api.throttle(principal)
    if resource_type:
        api.check_type(resource_type)
    if api.telemetry.recording:
        set_attributes(trace.get_current_span(), {
            "fhir.interaction": interaction, "fhir.resource_type": resource_type,
            "fhir.client_id": principal.client_id})
    return _Call(api, request, principal, interaction, resource_type)


def _remote(call: _Call) -> Remote | None:
    """The facade's proxy when a remote backend serves this request's type (fhir_proxy
    applies the same policy there); None: the local store answers."""
    facade = call.api.facade
    return None if facade is None else facade.remote(call.resource_type, call.interaction)


def _served_here(api: FhirApi, resource_type: str, interaction: str) -> None:
    """Bundles are answered by the local store: an entry for a type a backend serves is
    refused (the facade proxies single requests)."""
    backend = api.facade.backend_for(resource_type, interaction) if api.facade else None
    if backend is not None:
        raise FhirError(400, f"{resource_type} is served by backend {backend.name}; send "
                        "it on its own, not in a Bundle", code="not-supported")


def _check_format(request: web.Request) -> None:
    """JSON only: XML (by _format, Accept or Content-Type) answers 415."""
    wanted = request.query.get("_format", "") if "_format" in request.query_string else ""
    accept = request.headers.get("Accept", "")
    if "xml" in wanted or ("xml" in accept and "json" not in accept):
        raise FhirError(415, "only JSON is supported (application/fhir+json)")


def _access(call: _Call, action: Action, outcome: str = "success", *,
            resource_type: str | None = None, resource_id: str | None = None,
            patient: str | None = None, query: str | None = None,
            query_shape: str = "") -> AuditRecord:
    principal = call.principal
    profile = principal.profile or ""
    span = trace.get_current_span().get_span_context()
    return AuditRecord(
        action=action, outcome=outcome, client_id=principal.client_id,
        peer=call.request.remote or "",
        resource_type=resource_type if resource_type is not None else call.resource_type,
        resource_id=resource_id, patient=patient, query=query, query_shape=query_shape,
        purpose=profile, profile=profile, control_id=call.request.headers.get(
            "X-Request-Id", "")[:64],
        trace_id=format(span.trace_id, "032x") if span.is_valid else "")


def _resource_answer(stored: StoredResource, body: bytes, status: int = 200,
                     location: str | None = None) -> web.Response:
    headers = {"ETag": f'W/"{stored.version}"',
               "Last-Modified": _http_date(stored.last_updated)}
    if location:
        headers["Location"] = location
    return web.Response(body=body, status=status, headers=headers,
                        content_type=FHIR_JSON)


@lru_cache(maxsize=4096)
def _http_date(instant: str) -> str:
    """Last-Modified from a stored instant (cached: reads of one version repeat it)."""
    return format_datetime(datetime.fromisoformat(instant.replace("Z", "+00:00")),
                           usegmt=True)


def _prefer_return(request: web.Request) -> str:
    prefer = request.headers.get("Prefer", "")
    for part in prefer.split(","):
        name, _, value = part.strip().partition("=")
        if name.strip() == "return":
            return value.strip().strip('"')
    return "representation"


def _lenient(request: web.Request) -> bool:
    return "handling=lenient" in request.headers.get("Prefer", "").replace(" ", "")


async def _body(request: web.Request, limit: int) -> dict[str, Any]:
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


def _validated(resource: dict[str, Any], resource_type: str, where: str = "") -> None:
    try:
        validate_incoming(resource, resource_type)
    except BodyError as exc:
        raise FhirError(exc.status, exc.reason) from None
    except InvalidResource as exc:
        path = f"{exc.resource_type}.{exc.path}" if exc.path else exc.resource_type
        expression = f"{where}.{path}" if where else path
        raise FhirError(422, f"{expression}: {exc.reason}", expression,
                        code="structure") from None


def _search_params(request: web.Request, form: MultiDict[str] | None = None
                   ) -> list[tuple[str, str]]:
    params = list(request.query.items())
    if form is not None:
        params.extend(form.items())
    return params


# -- reads -------------------------------------------------------------------------------------


@routes.get("/fhir/metadata")
async def metadata(request: web.Request) -> web.Response:
    """The CapabilityStatement: open, like the SMART well-known document."""
    _check_format(request)
    return web.Response(body=request.app[FHIR].capability, content_type=FHIR_JSON)


@routes.get(r"/fhir/{type:[A-Z][A-Za-z]+}/{id:[A-Za-z0-9\-.]{1,64}}")
async def read(request: web.Request) -> web.StreamResponse:
    call = await _call(request, "read", request.match_info["type"])
    if (remote := _remote(call)) is not None:
        return await remote.read(call)
    elements = _elements_param(call)
    stored = await _readable(call, request.match_info["id"])
    etag = f'W/"{stored.version}"'
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag})
    body = call.api.shaped(call.principal, stored, elements)
    return _resource_answer(stored, body)


async def _readable(call: _Call, id_: str, version: int | None = None) -> StoredResource:
    """The resource if it exists, is not deleted and lies in the caller's compartment;
    another patient's resource answers 404 exactly like one that does not exist."""
    api, type_ = call.api, call.resource_type
    api.authorize(call.principal, call.interaction, type_)
    stored = (await api.store.read(type_, id_) if version is None
              else await api.store.vread(type_, id_, version))
    patient = api.confined_to(call.principal, type_)
    if stored is None:
        await api.record([_access(call, Action.READ, "404", resource_id=f"{type_}/{id_}")])
        raise _unknown(type_)
    # Whose data this is (a Patient is its own; anything else is parsed to find out),
    # worked out once: it decides a confined caller's access and goes into the record.
    owners: set[str] = set()
    if not stored.deleted and (patient is not None or api.limits.audit_reads != "off"):
        owners = ({f"Patient/{stored.id}"} if type_ == "Patient"
                  else api.patients_of(type_, orjson.loads(stored.body)))
    if patient is not None and (stored.deleted or patient not in owners):
        # Whose a deleted version was cannot be shown either: both answer 404.
        await api.record([_access(call, Action.READ, "404", resource_id=f"{type_}/{id_}",
                                  patient=patient)])
        raise _unknown(type_)
    if stored.deleted:
        await api.record([_access(call, Action.READ, "410", resource_id=f"{type_}/{id_}")])
        raise FhirError(410, f"this {type_} was deleted")
    await _check_scope_constraints(call, id_)
    if api.limits.audit_reads != "off":
        await api.record_read([_access(call, Action.READ, resource_id=f"{type_}/{id_}",
                                  patient=min(owners) if owners else None)])
    return stored


async def _check_scope_constraints(call: _Call, id_: str) -> None:
    """A scope granted with `?param=value` permits reading only what matches it."""
    clauses = call.api.scope_clauses(call.principal, "read", call.resource_type)
    if not clauses:
        return
    query = SearchQuery(call.resource_type, ((IdMatch(id_),), *clauses), count=1)
    if not await call.api.store.count(query):
        raise _unknown(call.resource_type)


def _unknown(resource_type: str) -> FhirError:
    return FhirError(404, f"no {resource_type} with this id is known")


def _elements_param(call: _Call) -> list[str] | None:
    """_elements on a read, checked and expanded as a search does it (a choice element
    such as `effective` keeps effectiveDateTime); checked before anything is read."""
    raw = call.request.query.get("_elements")
    if not raw:
        return None
    parsed = _parse(call.api, call.resource_type, [("_elements", raw)], lenient=False)
    return list(parsed.elements or ())


@routes.get(r"/fhir/{type:[A-Z][A-Za-z]+}/{id:[A-Za-z0-9\-.]{1,64}}/_history/{vid:\d{1,18}}")
async def vread(request: web.Request) -> web.StreamResponse:
    call = await _call(request, "vread", request.match_info["type"])
    if (remote := _remote(call)) is not None:
        return await remote.vread(call)
    stored = await _readable(call, request.match_info["id"], int(request.match_info["vid"]))
    return _resource_answer(stored, call.api.shaped(call.principal, stored))


@routes.get(r"/fhir/{type:[A-Z][A-Za-z]+}/{id:[A-Za-z0-9\-.]{1,64}}/_history")
async def instance_history(request: web.Request) -> web.Response:
    call = await _call(request, "history", request.match_info["type"])
    if (remote := _remote(call)) is not None:
        return await remote.history(call)
    id_ = request.match_info["id"]
    api = call.api
    api.authorize(call.principal, "read", call.resource_type)
    current = await api.store.read(call.resource_type, id_)
    if current is None:
        raise _unknown(call.resource_type)
    patient = api.confined_to(call.principal, call.resource_type)
    if patient is not None:
        # The compartment of the latest live version decides, as for a read.
        page = await api.store.history(HistoryQuery(call.resource_type, id_, count=1000))
        live = [v for v in page.resources if not v.deleted]
        if not live or not api.in_compartment(call.resource_type,
                                               orjson.loads(live[0].body), patient):
            raise _unknown(call.resource_type)
    # Whose history this is, for the audit record: the current version's patient.
    owners = (set() if current.deleted
              else api.patients_of(call.resource_type, orjson.loads(current.body)))
    subject = min(owners) if owners else patient
    return await _history(call, HistoryQuery(call.resource_type, id_), id_, patient,
                          subject)


@routes.get(r"/fhir/{type:[A-Z][A-Za-z]+}/_history")
async def type_history(request: web.Request) -> web.Response:
    call = await _call(request, "history-type", request.match_info["type"])
    if (remote := _remote(call)) is not None:
        return await remote.history(call)
    call.api.authorize(call.principal, "search", call.resource_type)
    if call.api.confined_to(call.principal, call.resource_type) is not None:
        raise FhirError(403, "type history is not available to patient-level scopes")
    return await _history(call, HistoryQuery(call.resource_type), None)


async def _history(call: _Call, base_query: HistoryQuery, id_: str | None,
                   patient: str | None = None, subject: str | None = None) -> web.Response:
    request, api = call.request, call.api
    count = _int_param(request, "_count", api.limits.default_count, api.limits.max_count)
    offset = _int_param(request, "_offset", 0, 10**9)
    since = _since_param(request)
    query = HistoryQuery(base_query.resource_type, base_query.id, since=since,
                         count=count, offset=offset)
    page = await api.store.history(query)
    base = api.base(request)
    entries = []
    for version in page.resources:
        if patient is not None and not version.deleted and not api.in_compartment(
                version.resource_type, orjson.loads(version.body), patient):
            continue  # a version from another patient's compartment: vread says 404 too
        url = f"{base}/{version.resource_type}/{version.id}"
        method = "DELETE" if version.deleted else ("POST" if version.version == 1 else "PUT")
        parts = [b'{"fullUrl":', orjson.dumps(url)]
        if not version.deleted:
            parts += [b',"resource":', api.shaped(call.principal, version)]
        parts += [b',"request":', orjson.dumps({"method": method, "url": (
            f"{version.resource_type}/{version.id}" if method != "POST"
            else version.resource_type)}), b',"response":', orjson.dumps({
                "status": "410 Gone" if version.deleted else "200 OK",
                "etag": f'W/"{version.version}"', "lastModified": version.last_updated}),
            b"}"]
        entries.append(b"".join(parts))
    links = _links(request, base, offset, count, page.total or 0)
    if api.limits.audit_reads != "off":
        await api.record_read([_access(call, Action.READ, resource_id=(
            f"{call.resource_type}/{id_}" if id_ else None), query_shape="_history",
            patient=subject)])
    # A confined caller's total would count the versions left out.
    return _bundle("history", entries, links, page.total if patient is None else None)


def _since_param(request: web.Request) -> str | None:
    """_since as the store's fixed-width UTC instant: the store compares text, so an
    offset or a shorter form given as is would compare wrong."""
    raw = request.query.get("_since")
    if raw is None:
        return None
    covered = date_range(raw.strip().replace(" ", "+"))  # an unencoded '+' is a space
    if covered is None:
        raise FhirError(400, "_since must be an instant, e.g. 2026-11-26T08:30:00Z", "_since")
    return covered[0]


def _int_param(request: web.Request, name: str, default: int, ceiling: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise FhirError(400, f"{name} must be a non-negative integer", name)
    return min(int(raw), ceiling)


def _links(request: web.Request, base: str, offset: int, count: int,
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


def _bundle(kind: str, entries: Sequence[bytes], links: Sequence[tuple[str, str]],
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


# -- search ---------------------------------------------------------------------------------


@routes.get(r"/fhir/{type:[A-Z][A-Za-z]+}")
async def search(request: web.Request) -> web.Response:
    call = await _call(request, "search", request.match_info["type"])
    return await _search(call, _search_params(request))


@routes.post(r"/fhir/{type:[A-Z][A-Za-z]+}/_search")
async def search_post(request: web.Request) -> web.Response:
    call = await _call(request, "search", request.match_info["type"])
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise FhirError(415, "POST _search takes application/x-www-form-urlencoded")
    if request.content_length is not None and \
            request.content_length > call.api.limits.max_body_bytes:
        raise FhirError(413, "the search form is too large")
    form = await request.post()
    fields: MultiDict[str] = MultiDict((k, v) for k, v in form.items() if isinstance(v, str))
    return await _search(call, _search_params(request, fields))


async def _search(call: _Call, params: list[tuple[str, str]]) -> web.Response:
    if (remote := _remote(call)) is not None:  # GET and POST _search alike
        return await remote.search(call, params)
    api, principal, type_ = call.api, call.principal, call.resource_type
    api.authorize(principal, "search", type_)
    parsed = _parse(api, type_, params, _lenient(call.request))
    _check_profile_search(api, principal, type_, parsed)
    _check_include_targets(api, principal, parsed)
    query = _confined(call, type_, parsed.query)
    page_size = query.count if query.count is not None else api.limits.default_count
    if parsed.summary_count:
        total = await api.store.count(query)
        if api.limits.audit_reads != "off":
            await api.record_read([_search_access(call, params, parsed, patient=None)])
        return _bundle("searchset", [], [], total)
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
    links = _links(call.request, base, query.offset, page_size, page.total, has_more,
                   search=(type_, params))
    patient = api.confined_to(principal, type_)
    if patient is None and type_ == "Patient" and len(matches) == 1:
        patient = f"Patient/{matches[0].id}"
    if api.limits.audit_reads != "off":
        await api.record_read([_search_access(call, params, parsed, patient=patient)])
    return _bundle("searchset", entries, links, page.total)


def _parse(api: FhirApi, type_: str, params: list[tuple[str, str]],
           lenient: bool) -> ParsedSearch:
    try:
        return api.registry.parse(type_, params, default_count=api.limits.default_count,
                                  max_count=api.limits.max_count, lenient=lenient)
    except UnsupportedFormat:
        raise FhirError(415, "only JSON is supported (application/fhir+json)") from None
    except SearchError as exc:
        raise FhirError(400, str(exc), exc.param) from None


def _check_profile_search(api: FhirApi, principal: Principal, type_: str,
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


def _check_include_targets(api: FhirApi, principal: Principal, parsed: ParsedSearch) -> None:
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


def _confined(call: _Call, type_: str, query: SearchQuery) -> SearchQuery:
    """The query cut to the caller's patient compartment and scope constraints."""
    api = call.api
    clauses = list(query.clauses)
    clauses.extend(api.scope_clauses(call.principal, "search", type_))
    patient = api.confined_to(call.principal, type_)
    if patient is not None:
        clauses.append(api.compartment_clause(type_, patient))
    return SearchQuery(type_, tuple(clauses), query.sort, query.count, query.offset)


def _search_entry(api: FhirApi, principal: Principal, base: str, stored: StoredResource,
                  mode: str, elements: Sequence[str] | None) -> bytes:
    url = f"{base}/{stored.resource_type}/{stored.id}"
    return b"".join((b'{"fullUrl":', orjson.dumps(url), b',"resource":',
                     api.shaped(principal, stored, elements),
                     b',"search":{"mode":"', mode.encode(), b'"}}'))


async def _includes(call: _Call, parsed: ParsedSearch,
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


async def _add_visible(call: _Call, type_: str, clause: tuple[Match, ...],
                       found: dict[tuple[str, str], StoredResource],
                       seen: set[tuple[str, str]]) -> None:
    api = call.api
    if type_ not in api.types:
        return
    # An included type is checked like a search of its own: scopes, profile, compartment.
    api.authorize(call.principal, "search", type_)
    query = _confined(call, type_, SearchQuery(type_, (clause,),
                                               count=api.limits.max_count))
    page = await api.store.search(query)
    for stored in page.resources:
        key = (stored.resource_type, stored.id)
        if key not in seen:
            seen.add(key)
            found[key] = stored


def _search_access(call: _Call, params: Sequence[tuple[str, str]], parsed: ParsedSearch,
                   patient: str | None) -> AuditRecord:
    return _access(call, Action.SEARCH, query=urlencode(list(params)),
                   query_shape=parsed.shape, patient=patient)


# -- writes -----------------------------------------------------------------------------------


@routes.post(r"/fhir/{type:[A-Z][A-Za-z]+}")
async def create(request: web.Request) -> web.Response:
    call = await _call(request, "create", request.match_info["type"])
    if (remote := _remote(call)) is not None:
        return await remote.create(call)
    resource = await _body(request, call.api.limits.max_body_bytes)
    _validated(resource, call.resource_type)
    resource.pop("id", None)  # FHIR R4 http.html#create: the server assigns the id
    condition = request.headers.get("If-None-Exist")
    entry = Entry(0, "POST", call.resource_type, None, (), resource, None, None,
                  query_pairs(condition) if condition else (), call.resource_type)
    return await _write(call, entry)


@routes.put(r"/fhir/{type:[A-Z][A-Za-z]+}/{id:[A-Za-z0-9\-.]{1,64}}")
async def update(request: web.Request) -> web.Response:
    call = await _call(request, "update", request.match_info["type"])
    if (remote := _remote(call)) is not None:
        return await remote.update(call)
    id_ = request.match_info["id"]
    resource = await _body(request, call.api.limits.max_body_bytes)
    _validated(resource, call.resource_type)
    if resource.get("id") != id_:
        raise FhirError(400, "the resource id must match the id in the URL",
                        f"{call.resource_type}.id")
    entry = Entry(0, "PUT", call.resource_type, id_, (), resource, None,
                  _if_match(request), (), f"{call.resource_type}/{id_}")
    return await _write(call, entry)


@routes.put(r"/fhir/{type:[A-Z][A-Za-z]+}")
async def conditional_update(request: web.Request) -> web.Response:
    call = await _call(request, "update", request.match_info["type"])
    if (remote := _remote(call)) is not None:
        return await remote.conditional_update(call)
    params = tuple(request.query.items())
    if not params:
        raise FhirError(400, "a conditional update needs search parameters")
    resource = await _body(request, call.api.limits.max_body_bytes)
    _validated(resource, call.resource_type)
    entry = Entry(0, "PUT", call.resource_type, None, params, resource, None,
                  _if_match(request), (), call.resource_type)
    return await _write(call, entry)


@routes.delete(r"/fhir/{type:[A-Z][A-Za-z]+}/{id:[A-Za-z0-9\-.]{1,64}}")
async def delete(request: web.Request) -> web.Response:
    call = await _call(request, "delete", request.match_info["type"])
    if (remote := _remote(call)) is not None:
        return await remote.delete(call)
    id_ = request.match_info["id"]
    entry = Entry(0, "DELETE", call.resource_type, id_, (), None, None, _if_match(request),
                  (), f"{call.resource_type}/{id_}")
    return await _write(call, entry)


@routes.delete(r"/fhir/{type:[A-Z][A-Za-z]+}")
async def conditional_delete(request: web.Request) -> web.Response:
    call = await _call(request, "delete", request.match_info["type"])
    if (remote := _remote(call)) is not None:
        return await remote.conditional_delete(call)
    params = tuple(request.query.items())
    if not params:
        raise FhirError(400, "a conditional delete needs search parameters")
    entry = Entry(0, "DELETE", call.resource_type, None, params, None, None, None, (),
                  call.resource_type)
    return await _write(call, entry)


def _if_match(request: web.Request) -> int | None:
    value = request.headers.get("If-Match")
    return parse_etag(value, "If-Match") if value else None


async def _write(call: _Call, entry: Entry) -> web.Response:
    api = call.api
    interaction = {"POST": "create", "PUT": "update", "DELETE": "delete"}[entry.method]
    api.authorize(call.principal, interaction, entry.resource_type)
    write = await _checked_write(call, entry, "")
    try:
        [result] = await api.store.transact([write])
    except WriteConflict as conflict:
        await api.record([_access(call, _ACTIONS[entry.method], str(conflict.status),
                                  resource_id=_target(entry))])
        raise FhirError(conflict.status, _conflict_reason(conflict)) from None
    assert isinstance(result, WriteOutcome)
    stored = result.stored
    patients = set()
    if stored is not None and not stored.deleted:
        patients = api.patients_of(stored.resource_type, orjson.loads(stored.body))
    await api.record([_access(
        call, _ACTIONS[entry.method], resource_id=(
            f"{stored.resource_type}/{stored.id}" if stored else _target(entry)),
        patient=next(iter(sorted(patients)), None))])
    if stored is None or entry.method == "DELETE":
        return web.Response(status=204)
    base = api.base(call.request)
    location = f"{base}/{stored.resource_type}/{stored.id}/_history/{stored.version}"
    prefer = _prefer_return(call.request)
    if not result.changed and not call.principal.scopes.permits("read", stored.resource_type):
        # A matched If-None-Exist answers a resource the caller did not write: without a
        # read scope it may learn that it exists, not what it says.
        prefer = "minimal"
    if prefer == "minimal":
        response = web.Response(status=result.status)
    elif prefer == "OperationOutcome":
        response = web.Response(body=orjson.dumps(information(
            f"{entry.method} {_REASONS.get(result.status, '')}".strip())),
            status=result.status, content_type=FHIR_JSON)
    else:
        return _resource_answer(stored, api.shaped(call.principal, stored), result.status,
                                location if result.status == 201 else None)
    response.headers["ETag"] = f'W/"{stored.version}"'
    response.headers["Last-Modified"] = _http_date(stored.last_updated)
    if result.status == 201:
        response.headers["Location"] = location
    return response


def _target(entry: Entry) -> str | None:
    return f"{entry.resource_type}/{entry.id}" if entry.id else None


_STORE_ENTRY = re.compile(r"^entry \d+: ")


def _conflict_reason(conflict: WriteConflict) -> str:
    """The store's reason without its 'entry N: ' prefix: N counts the writes handed to
    the store, not the Bundle's entries, so the edge names the entry itself (or none)."""
    return _STORE_ENTRY.sub("", conflict.reason, count=1)


async def _checked_write(call: _Call, entry: Entry, where: str) -> WriteRequest:
    """The store write for an entry, after the compartment checks a patient scope needs."""
    api = call.api
    interaction = _INTERACTION[entry.method]
    try:
        write = write_request(api.registry, entry)
    except SearchError as exc:
        raise FhirError(400, f"{where}{exc}", exc.param) from None
    constraints = api.scope_clauses(call.principal, interaction, entry.resource_type)
    if constraints:
        write = await _constrained(call, entry, write, constraints, where)
    patient = api.confined_to(call.principal, entry.resource_type)
    if patient is None:
        return write
    if entry.resource is not None and not api.in_compartment(
            entry.resource_type, entry.resource, patient):
        raise FhirError(403, f"{where}a patient-level scope may only write resources in "
                        "its patient's compartment")
    if entry.id is not None:
        # Only a live resource in the compartment may be updated or deleted. An unknown id
        # answers the same 404 as another patient's (no update-as-create, no 204 for a
        # delete of nothing): otherwise the answer would tell which ids exist.
        current = await api.store.read(entry.resource_type, entry.id)
        if current is None or current.deleted or not api.in_compartment(
                entry.resource_type, orjson.loads(current.body), patient):
            raise FhirError(404, f"{where}no {entry.resource_type} with this id is known")
    elif write.condition is not None:
        resource = write.resource
        if write.method == "PUT" and resource is not None:
            # A conditional update that creates takes a server id: a client-chosen one
            # could collide with another patient's resource and say so (409).
            resource = {k: v for k, v in resource.items() if k != "id"}
        # If-None-Exist too: a match outside the compartment would be answered with
        # another patient's resource.
        clauses = (*write.condition.clauses,
                   api.compartment_clause(entry.resource_type, patient))
        write = WriteRequest(write.method, write.resource_type, write.id, resource,
                             SearchQuery(entry.resource_type, clauses), write.if_match,
                             write.full_url)
    return write


async def _constrained(call: _Call, entry: Entry, write: WriteRequest,
                       constraints: tuple[tuple[Match, ...], ...], where: str) -> WriteRequest:
    """A write under a scope granted with `?param=value` (e.g. Observation.cu?category=
    laboratory): what is written must meet the constraint, and so must what it replaces
    or deletes; a conditional write only finds resources that meet it."""
    api, type_ = call.api, entry.resource_type

    def meets(resource: dict[str, Any]) -> bool:
        verdict = api.registry.matches(type_, resource, constraints)
        if verdict is None:
            raise FhirError(403, f"{where}the granted scope's constraint cannot be checked "
                            "on a write; it needs an unconstrained scope")
        return verdict

    if entry.resource is not None and not meets(entry.resource):
        raise FhirError(403, f"{where}the granted scope does not permit writing this "
                        f"{type_}")
    if entry.id is not None:
        # What it replaces or deletes: one the scope does not show answers like a read.
        current = await api.store.read(type_, entry.id)
        if current is not None and not current.deleted and not meets(
                orjson.loads(current.body)):
            raise FhirError(404, f"{where}no {type_} with this id is known")
        return write
    if write.condition is None:
        return write
    return WriteRequest(write.method, write.resource_type, write.id, write.resource,
                        SearchQuery(type_, (*write.condition.clauses, *constraints)),
                        write.if_match, write.full_url)


# -- batch and transaction ------------------------------------------------------------------


_INTERACTION = {"POST": "create", "PUT": "update", "DELETE": "delete"}


@routes.post("/fhir")
@routes.post("/fhir/")
async def batch_or_transaction(request: web.Request) -> web.Response:
    call = await _call(request, "batch")
    api = call.api
    bundle = await _body(request, api.limits.max_body_bytes)
    if bundle.get("resourceType") != "Bundle":
        raise FhirError(400, "POST to the base takes a batch or transaction Bundle",
                        "Bundle.resourceType")
    kind, entries = parse_bundle(bundle, api.limits.max_bundle_entries)
    atomic = kind == "transaction"
    answers: list[bytes | None] = [None] * len(entries)
    writes: list[tuple[Entry, WriteRequest]] = []
    for entry in entries:
        if entry.method == "GET" and not atomic:
            continue  # a batch answers each read in its own entry
        where = f"Bundle.entry[{entry.index}]: "
        try:
            api.check_type(entry.resource_type)
            _served_here(api, entry.resource_type, _INTERACTION.get(
                entry.method, "read" if entry.id else "search"))
            if entry.method == "GET":
                # A transaction is refused whole, before any write, for a read it may
                # not make either.
                api.authorize(call.principal, "read" if entry.id else "search",
                              entry.resource_type)
                continue
            api.authorize(call.principal, _INTERACTION[entry.method], entry.resource_type)
            if entry.resource is not None:
                _validated(entry.resource, entry.resource_type,
                           f"Bundle.entry[{entry.index}].resource")
            writes.append((entry, await _checked_write(call, entry, where)))
        except FhirError as exc:
            if atomic:
                raise FhirError(exc.status, exc.reason if exc.reason.startswith("Bundle")
                                else where + exc.reason, exc.expression) from None
            answers[entry.index] = _error_entry(exc.status, exc.reason)
    outcomes: list[WriteOutcome | WriteConflict] = []
    if writes:
        try:
            outcomes = await api.store.transact([w for _, w in writes], atomic=atomic)
        except WriteConflict as conflict:
            index = writes[conflict.entry][0].index if conflict.entry is not None else None
            raise FhirError(conflict.status, (f"Bundle.entry[{index}]: " if index is not None
                                              else "") + _conflict_reason(conflict)
                             ) from None
    base = api.base(request)
    records = []
    for (entry, _), result in zip(writes, outcomes, strict=True):
        action = _ACTIONS[entry.method]
        if isinstance(result, WriteConflict):
            answers[entry.index] = _error_entry(result.status, _conflict_reason(result))
            records.append(_access(call, action, str(result.status),
                                   resource_type=entry.resource_type,
                                   resource_id=_target(entry)))
            continue
        answers[entry.index] = _write_entry(api, call.principal, base, result)
        stored = result.stored
        records.append(_access(call, action, resource_type=entry.resource_type,
                               resource_id=(f"{stored.resource_type}/{stored.id}"
                                            if stored else _target(entry))))
    await api.record(records)
    for entry in entries:
        if entry.method == "GET":
            answers[entry.index] = await _get_entry(call, entry)
    return _bundle(f"{kind}-response", [a or b"{}" for a in answers], [], None)


def _write_entry(api: FhirApi, principal: Principal, base: str,
                 result: WriteOutcome) -> bytes:
    stored = result.stored
    response: dict[str, Any] = {"status": f"{result.status} {_REASONS.get(result.status, '')}"
                                .strip()}
    if stored is None:
        return b'{"response":' + orjson.dumps(response) + b"}"
    response["location"] = f"{stored.resource_type}/{stored.id}/_history/{stored.version}"
    response["etag"] = f'W/"{stored.version}"'
    response["lastModified"] = stored.last_updated
    if not result.changed and not principal.scopes.permits("read", stored.resource_type):
        return b'{"response":' + orjson.dumps(response) + b"}"  # as in _write
    return b"".join((b'{"fullUrl":', orjson.dumps(f"{base}/{stored.resource_type}/"
                                                   f"{stored.id}"),
                     b',"resource":', api.shaped(principal, stored),
                     b',"response":', orjson.dumps(response), b"}"))


def _error_entry(status: int, reason: str) -> bytes:
    return orjson.dumps({"response": {
        "status": f"{status} {_REASONS.get(status, '')}".strip(),
        "outcome": operation_outcome(status, reason)}})


async def _get_entry(call: _Call, entry: Entry) -> bytes:
    """A GET inside a batch: a read or a search, answered like its own request."""
    sub = _Call(call.api, call.request, call.principal,
                "read" if entry.id else "search", entry.resource_type)
    try:
        call.api.check_type(entry.resource_type)
        _served_here(call.api, entry.resource_type, sub.interaction)
        if entry.id is not None:
            stored = await _readable(sub, entry.id)
            body = call.api.shaped(call.principal, stored)
            return b"".join((b'{"resource":', body, b',"response":', orjson.dumps({
                "status": "200 OK", "etag": f'W/"{stored.version}"',
                "lastModified": stored.last_updated}), b"}"))
        response = await _search(sub, list(entry.params))
        assert isinstance(response.body, bytes)
        return b'{"resource":' + response.body + b',"response":{"status":"200 OK"}}'
    except FhirError as exc:
        return _error_entry(exc.status, exc.reason)


# -- errors: one place turns every refusal into an OperationOutcome --------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure under /fhir answers an OperationOutcome; others pass untouched.

    Each request is counted and timed by method and status; with spans exported it gets a
    `fhir.request` span, the child of the caller's W3C `traceparent` if it sent one."""
    if not request.path.startswith("/fhir"):
        return await handler(request)
    api = request.app.get(FHIR)
    if api is None:
        try:
            return await handler(request)
        except Exception as exc:
            return _refusal(request, exc)
    telemetry = api.telemetry
    counted = telemetry.fhir
    started = counted.clock()
    if not telemetry.recording:
        try:  # no span to fill: no cost
            response = await handler(request)
        except Exception as exc:
            response = _refusal(request, exc)
        counted.request(request.method, response.status, started)
        return response
    # Only names and codes go on the span: never the query string (url.query) or ids.
    with telemetry.tracer.start_as_current_span(
            "fhir.request", context=telemetry.parent_context(request.headers),
            kind=trace.SpanKind.SERVER) as span:
        try:
            response = await handler(request)
        except Exception as exc:
            response = _refusal(request, exc)
        set_attributes(span, {"http.request.method": counted.method_label(request.method),
                              "http.response.status_code": response.status})
        counted.request(request.method, response.status, started)
        return response


def _refusal(request: web.Request, error: Exception) -> web.StreamResponse:
    """The OperationOutcome for whatever a handler raised (the one place errors turn into
    answers)."""
    try:
        raise error
    except FhirError as exc:
        return _outcome(exc.status, exc.reason, exc.expression, exc.code, exc.headers)
    except AuthError as exc:
        headers = {"WWW-Authenticate": exc.www_authenticate} if exc.www_authenticate else {}
        return _outcome(exc.status, exc.reason, headers=headers)
    except StoreUnavailable:
        return _outcome(503, "the store is unavailable; try again later",
                        headers={"Retry-After": "5"})
    except web.HTTPMethodNotAllowed:
        return _outcome(405, f"{request.method} is not supported on this URL")
    except web.HTTPNotFound:
        return _outcome(404, "no FHIR interaction is defined at this URL")
    except web.HTTPRequestEntityTooLarge:
        return _outcome(413, "the body is too large")
    except web.HTTPException as exc:
        return _outcome(exc.status, exc.reason or "refused")
    except Exception as exc:  # the caller gets a 500; the type alone goes to the log
        log.error("FHIR %s failed: %s", request.method, type(exc).__name__)
        return _outcome(500, "internal error; the request was not completed")


def _outcome(status: int, reason: str, expression: str | None = None,
             code: str | None = None, headers: Mapping[str, str] | None = None
             ) -> web.Response:
    body = _outcome_bytes(FhirError(status, reason, expression, code))
    return web.Response(body=body, status=status, headers=dict(headers or {}),
                        content_type=FHIR_JSON)
