"""The FHIR facade: requests for resource types routed to a remote FHIR backend are
proxied to it, under the same policy as the local store's answers.

Before any call: the caller's scopes and task profile (403), search parameters parsed
with the same table (unknown ones refused, values never echoed), a write's body checked
by the same guard and validation. The query sent for a patient-confined caller carries
the patient's compartment parameter. What comes back is normalised by the backend's
vendor table, then checked again in memory (compartment and scope constraints, every
search entry: a backend that ignores a parameter cannot widen an answer), cut by the
profile and `_elements`, and its URLs rewritten to our base. The backend's refusals
(status, OperationOutcome, Retry-After) pass through as it sent them; a backend that
cannot be asked answers 503 with Retry-After at once (an open breaker makes no network
call), no answer in time 504, an answer that is not FHIR JSON 502. GET reads and searches
are cached for a few seconds per backend (the raw answer, before policy, which every hit
applies again); a write drops its type's entries. Batch and transaction Bundles are
answered by the local store only: an entry for a proxied type is refused there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import trace

from gateway.audit import Action
from gateway.edge.fhir_api import FhirApi
from gateway.edge.fhir_http import (
    _access,
    _body,
    _Call,
    _check_include_targets,
    _check_profile_search,
    _elements_param,
    _if_match,
    _lenient,
    _parse,
    _search_access,
    _unknown,
    _validated,
)
from gateway.fhir import jsonio
from gateway.fhir.outcome import FHIR_JSON, FhirError
from gateway.fhir.search import ParsedSearch, SearchError
from gateway.fhir.transaction import condition, query_pairs
from gateway.forward.backend import BackendTimeout, BackendUnavailable, FhirResponse
from gateway.forward.cache import ReadCache
from gateway.forward.fhir_backend import FhirBackend
from gateway.forward.normalize import Normalizer
from gateway.forward.routes import LOCAL, Router
from gateway.store.fhir import Match
from gateway.telemetry import set_attributes

Json = dict[str, Any]
Pairs = list[tuple[str, str]]

# Search parameters not sent on: we answer JSON ourselves, `_elements` is applied here
# (the compartment and constraint checks need the whole resource) and `_count` is sent
# as the page size we allow.
_KEPT_HERE = frozenset({"_format", "_pretty", "_elements", "_count"})
_SENT_CONTROLS = frozenset({"_id", "_lastUpdated", "_offset", "_sort", "_include",
                            "_revinclude", "_summary", "_total"})
# Backend answer headers a caller sees (Location is rewritten to our base).
_PASSED_HEADERS = ("ETag", "Last-Modified")
_FORM = "application/x-www-form-urlencoded"
_VERSION = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# FHIR R4 §3.1.1.1.8 (search escaping): characters escaped with '\' in a token value.
_SEARCH_ESCAPES = str.maketrans({"\\": "\\\\", "|": "\\|", ",": "\\,", "$": "\\$"})


class Facade:
    """Which backend serves a FHIR request, the read-through cache and the vendor tables."""

    def __init__(self, router: Router, backends: Mapping[str, FhirBackend],
                 cache: ReadCache | Mapping[str, ReadCache] | None = None,
                 normalizers: Mapping[str, Normalizer] | None = None) -> None:
        """`cache`: one read-through cache for every backend, or one per backend name (a
        backend without one is not cached); `normalizers`: vendor tables by backend."""
        self.router = router
        self.backends = dict(backends)
        self.cache = cache
        self.normalizers = dict(normalizers or {})
        self._routes: dict[tuple[str, str], FhirBackend | None] = {}

    def cache_for(self, backend: str) -> ReadCache | None:
        if self.cache is None or isinstance(self.cache, ReadCache):
            return self.cache
        return self.cache.get(backend)

    def backend_for(self, resource_type: str, interaction: str) -> FhirBackend | None:
        """The backend that answers this interaction on this type; None: the local store."""
        key = (resource_type, interaction)
        if key not in self._routes:
            asked = "history" if interaction.startswith("history") else interaction
            name = self.router.for_request(resource_type, asked)
            self._routes[key] = None if name == LOCAL else self.backends.get(name)
        return self._routes[key]

    def remote(self, resource_type: str, interaction: str) -> Remote | None:
        """The proxy for a request whose type a backend serves; None: the local store."""
        backend = self.backend_for(resource_type, interaction)
        return None if backend is None else Remote(self, backend)

    def normalizer(self, backend: str) -> Normalizer | None:
        found = self.normalizers.get(backend)
        return found if found else None


class _Passthrough(Exception):
    """A backend's refusal, answered as it came (raised out of the checks, answered by
    the public methods of Remote)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


@dataclass(frozen=True, slots=True)
class _Visibility:
    """What a caller may see of one resource type in a search answer."""

    allowed: bool
    patient: str | None = None
    clauses: tuple[tuple[Match, ...], ...] = ()
    trusted: bool = False  # the constraint went to the backend: what it cannot judge passes


@dataclass(slots=True)
class Remote:
    """The facade bound to the backend that serves one request."""

    facade: Facade
    backend: FhirBackend
    _seen: dict[str, _Visibility] = field(default_factory=dict)

    # -- the interactions ------------------------------------------------------------------

    async def read(self, call: _Call) -> web.Response:
        return await _answered(self._read(call, None))

    async def vread(self, call: _Call) -> web.Response:
        return await _answered(self._read(call, call.request.match_info["vid"]))

    async def history(self, call: _Call) -> web.Response:
        call.api.authorize(call.principal, "read" if call.interaction == "history"
                           else "search", call.resource_type)
        raise FhirError(501, f"history is not available for {call.resource_type}: it is "
                        f"served by backend {self.backend.name}", code="not-supported")

    async def search(self, call: _Call, params: Pairs) -> web.Response:
        return await _answered(self._search(call, params))

    async def create(self, call: _Call) -> web.Response:
        return await _answered(self._create(call))

    async def update(self, call: _Call) -> web.Response:
        return await _answered(self._update(call))

    async def conditional_update(self, call: _Call) -> web.Response:
        return await _answered(self._conditional_update(call))

    async def delete(self, call: _Call) -> web.Response:
        return await _answered(self._delete(call))

    async def conditional_delete(self, call: _Call) -> web.Response:
        return await _answered(self._conditional_delete(call))

    # -- reads -------------------------------------------------------------------------------

    async def _read(self, call: _Call, version: str | None) -> web.Response:
        api, principal, type_ = call.api, call.principal, call.resource_type
        id_ = call.request.match_info["id"]
        elements = _elements_param(call) if version is None else None
        api.authorize(principal, call.interaction, type_)
        target = f"{type_}/{id_}"
        path = target if version is None else f"{target}/_history/{version}"
        response = await self._ask(call, "GET", path, cached=(type_,))
        patient = api.confined_to(principal, type_)
        if response.status == 404 or (response.status == 410 and patient is not None):
            # Another patient's deleted resource answers like an unknown one.
            await api.record([_access(call, Action.READ, "404", resource_id=target,
                                      patient=patient if response.status == 410 else None)])
            raise _unknown(type_)
        if response.status == 410:
            await api.record([_access(call, Action.READ, "410", resource_id=target)])
            raise FhirError(410, f"this {type_} was deleted")
        if response.status != 200:
            raise self._refused(response)
        resource = self._resource(response, type_)
        owners: set[str] = set()
        if patient is not None or api.limits.audit_reads != "off":
            owners = api.patients_of(type_, resource)
        if patient is not None and patient not in owners:
            await api.record([_access(call, Action.READ, "404", resource_id=target,
                                      patient=patient)])
            raise _unknown(type_)
        clauses = api.scope_clauses(principal, "read", type_)
        if clauses and api.registry.matches(type_, resource, clauses) is not True:
            raise _unknown(type_)  # as the local read: what the scope does not show
        if api.limits.audit_reads != "off":
            await api.record_read([_access(call, Action.READ, resource_id=target,
                                           patient=min(owners) if owners else None)])
        headers = _passed_headers(response, resource)
        etag = headers.get("ETag")
        if etag is not None and call.request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        body = jsonio.dumps(api.shaped_resource(principal, resource, elements))
        return web.Response(body=body, headers=headers, content_type=FHIR_JSON)

    async def _search(self, call: _Call, params: Pairs) -> web.Response:
        api, principal, type_ = call.api, call.principal, call.resource_type
        api.authorize(principal, "search", type_)
        lenient = _lenient(call.request)
        parsed = _parse(api, type_, params, lenient)
        _check_profile_search(api, principal, type_, parsed)
        _check_include_targets(api, principal, parsed)
        constraint, sent_on = self._constraint_pairs(call, "search", type_)
        if parsed.summary_count and not sent_on:
            raise FhirError(403, "the granted scopes' constraints cannot be applied to a "
                            f"count of {type_}; search without _summary=count")
        query = self._outgoing(call, type_, params, parsed) + constraint
        patient = api.confined_to(principal, type_)
        if patient is not None:
            query += self._compartment_pairs(call, type_, patient)
        types = (type_, *_included_types(api.registry, parsed))
        if call.request.method == "POST":
            # A search sent by POST stays a POST: its values stay out of URLs and logs.
            response = await self._ask(call, "POST", f"{type_}/_search", key=query,
                                       body=urlencode(query).encode(),
                                       headers={"Content-Type": _FORM}, idempotent=True,
                                       cached=types)
        else:
            response = await self._ask(call, "GET", type_, query=query, cached=types)
        if response.status != 200:
            raise self._refused(response)
        bundle = self._resource(response, "Bundle")
        base = api.base(call.request)
        entries: list[Json] = []
        matches: list[Json] = []
        hidden = False
        self._seen[type_] = self._visibility(call, type_, trusted=sent_on)
        for raw in _list(bundle.get("entry")):
            entry = self._search_entry(call, raw, base, parsed)
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
        links = [link for link in (self._link(raw, base) for raw in _list(bundle.get("link")))
                 if link is not None]
        if links:
            answer["link"] = links
        if entries:
            answer["entry"] = entries
        subject = patient
        if subject is None and type_ == "Patient" and len(matches) == 1:
            subject = f"Patient/{matches[0].get('id')}"
        if api.limits.audit_reads != "off":
            await api.record_read([_search_access(call, params, parsed, patient=subject)])
        return web.Response(body=jsonio.dumps(answer), content_type=FHIR_JSON)

    def _outgoing(self, call: _Call, type_: str, params: Pairs, parsed: ParsedSearch) -> Pairs:
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

    def _compartment_pairs(self, call: _Call, type_: str, patient: str) -> Pairs:
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

    def _constraint_pairs(self, call: _Call, interaction: str, type_: str
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

    def _visibility(self, call: _Call, type_: str, trusted: bool = False) -> _Visibility:
        api, principal = call.api, call.principal
        if type_ not in api.types:
            return _Visibility(False)
        try:
            api.authorize(principal, "search", type_)
            clauses = api.scope_clauses(principal, "search", type_)
        except FhirError:
            return _Visibility(False)
        return _Visibility(True, api.confined_to(principal, type_), clauses, trusted)

    def _search_entry(self, call: _Call, raw: Any, base: str,
                      parsed: ParsedSearch) -> Json | None:
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
        seen = self._seen.get(type_)
        if seen is None:
            seen = self._seen[type_] = self._visibility(call, type_)
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

    def _link(self, raw: Any, base: str) -> Json | None:
        """A paging link on our base; one elsewhere (not the backend's) is dropped."""
        if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
            return None
        url = self._ours(raw["url"], base)
        return None if url is None else {"relation": raw.get("relation", ""), "url": url}

    # -- writes ------------------------------------------------------------------------------

    async def _create(self, call: _Call) -> web.Response:
        api, type_ = call.api, call.resource_type
        api.authorize(call.principal, "create", type_)
        resource = await _body(call.request, api.limits.max_body_bytes)
        _validated(resource, type_)
        resource.pop("id", None)  # FHIR R4 http.html#create: the server assigns the id
        self._check_written(call, "create", resource)
        given = call.request.headers.get("If-None-Exist")
        match = list(query_pairs(given)) if given else _identifier_match(call, resource)
        headers = {"Content-Type": FHIR_JSON, **_prefer(call)}
        if match:
            _check_condition(call, match, "If-None-Exist: ")
            # A match outside the caller's compartment would answer another patient's.
            match += self._narrowing(call, "create")
            headers["If-None-Exist"] = urlencode(match, safe="/:|", quote_via=quote)
        # With If-None-Exist a repeat finds what the first made: safe to retry; without,
        # a lost answer could mean a second resource, so it is sent once.
        response = await self._ask(call, "POST", type_, body=jsonio.dumps(resource),
                                   headers=headers, idempotent=bool(match))
        self._invalidate(type_)
        return await self._written(call, response, Action.CREATE, resource, None)

    async def _update(self, call: _Call) -> web.Response:
        api, type_ = call.api, call.resource_type
        id_ = call.request.match_info["id"]
        api.authorize(call.principal, "update", type_)
        resource = await _body(call.request, api.limits.max_body_bytes)
        _validated(resource, type_)
        if resource.get("id") != id_:
            raise FhirError(400, "the resource id must match the id in the URL",
                            f"{type_}.id")
        self._check_written(call, "update", resource)
        await self._check_current(call, "update", id_)
        headers = {"Content-Type": FHIR_JSON, **_prefer(call), **_if_match_header(call)}
        response = await self._ask(call, "PUT", f"{type_}/{id_}", body=jsonio.dumps(resource),
                                   headers=headers)
        self._invalidate(type_)
        return await self._written(call, response, Action.UPDATE, resource, f"{type_}/{id_}")

    async def _conditional_update(self, call: _Call) -> web.Response:
        api, type_ = call.api, call.resource_type
        params = list(call.request.query.items())
        if not params:
            raise FhirError(400, "a conditional update needs search parameters")
        api.authorize(call.principal, "update", type_)
        resource = await _body(call.request, api.limits.max_body_bytes)
        _validated(resource, type_)
        _check_condition(call, params, "")
        self._check_written(call, "update", resource)
        narrowing = self._narrowing(call, "update")
        if api.confined_to(call.principal, type_) is not None:
            # A conditional update that creates takes a server id: a client-chosen one
            # could collide with another patient's resource and say so.
            resource.pop("id", None)
        headers = {"Content-Type": FHIR_JSON, **_prefer(call), **_if_match_header(call)}
        response = await self._ask(call, "PUT", type_, query=params + narrowing,
                                   body=jsonio.dumps(resource), headers=headers)
        self._invalidate(type_)
        return await self._written(call, response, Action.UPDATE, resource, None)

    async def _delete(self, call: _Call) -> web.Response:
        type_ = call.resource_type
        id_ = call.request.match_info["id"]
        call.api.authorize(call.principal, "delete", type_)
        await self._check_current(call, "delete", id_)
        response = await self._ask(call, "DELETE", f"{type_}/{id_}",
                                   headers=_if_match_header(call))
        self._invalidate(type_)
        return await self._written(call, response, Action.DELETE, None, f"{type_}/{id_}")

    async def _conditional_delete(self, call: _Call) -> web.Response:
        type_ = call.resource_type
        params = list(call.request.query.items())
        if not params:
            raise FhirError(400, "a conditional delete needs search parameters")
        call.api.authorize(call.principal, "delete", type_)
        _check_condition(call, params, "")
        narrowing = self._narrowing(call, "delete")
        response = await self._ask(call, "DELETE", type_, query=params + narrowing)
        self._invalidate(type_)
        return await self._written(call, response, Action.DELETE, None, None)

    def _check_written(self, call: _Call, interaction: str, resource: Json) -> None:
        """What is written must meet the scope's constraint and lie in the caller's
        compartment (403), as for the local store."""
        api, type_ = call.api, call.resource_type
        clauses = api.scope_clauses(call.principal, interaction, type_)
        if clauses and not _permitted_write(api, type_, resource, clauses):
            raise FhirError(403, f"the granted scope does not permit writing this {type_}")
        patient = api.confined_to(call.principal, type_)
        if patient is not None and not api.in_compartment(type_, resource, patient):
            raise FhirError(403, "a patient-level scope may only write resources in its "
                            "patient's compartment")

    async def _check_current(self, call: _Call, interaction: str, id_: str) -> None:
        """What an update or delete replaces must be visible to the caller: fetched fresh
        (never from the cache) when a compartment or a constraint limits the caller. An
        unknown id answers the same 404 as another patient's."""
        api, type_ = call.api, call.resource_type
        patient = api.confined_to(call.principal, type_)
        clauses = api.scope_clauses(call.principal, interaction, type_)
        if patient is None and not clauses:
            return
        response = await self._ask(call, "GET", f"{type_}/{id_}")
        if response.status in (404, 410):
            if patient is not None:
                raise _unknown(type_)
            return
        if response.status != 200:
            raise self._refused(response)
        current = self._resource(response, type_)
        if clauses and not _permitted_write(api, type_, current, clauses):
            raise _unknown(type_)
        if patient is not None and not api.in_compartment(type_, current, patient):
            raise _unknown(type_)

    def _narrowing(self, call: _Call, interaction: str) -> Pairs:
        """Parameters a conditional write's search gets so it finds only what the caller
        may see: the compartment, and the scope's constraint (403 if it cannot be sent)."""
        type_ = call.resource_type
        pairs, sent_on = self._constraint_pairs(call, interaction, type_)
        if not sent_on:
            raise FhirError(403, "the granted scopes' constraints are too complex to apply "
                            "to a conditional write")
        patient = call.api.confined_to(call.principal, type_)
        if patient is not None:
            pairs += self._compartment_pairs(call, type_, patient)
        return pairs

    async def _written(self, call: _Call, response: FhirResponse, action: Action,
                       sent: Json | None, target: str | None) -> web.Response:
        """A write's answer: recorded, its representation normalised and cut for the
        caller, its Location on our base."""
        api, principal, type_ = call.api, call.principal, call.resource_type
        if response.status >= 400:
            await api.record([_access(call, action, str(response.status),
                                      resource_id=target)])
            raise self._refused(response)
        if not 200 <= response.status < 300:
            raise self._bad_answer(f"HTTP {response.status}")
        base = api.base(call.request)
        document = self._resource(response, None) if response.body.strip() else None
        resource = document if document and document.get("resourceType") == type_ else None
        headers = _passed_headers(response, resource)
        location = response.headers.get("Location")
        if location:
            ours = self._ours(location, base)
            if ours is not None:
                headers["Location"] = ours
        id_ = resource.get("id") if resource is not None else None
        if not isinstance(id_, str) and location:
            id_ = _location_id(location, type_)
        written = f"{type_}/{id_}" if isinstance(id_, str) and id_ else target
        owners = api.patients_of(type_, resource if resource is not None else sent or {})
        await api.record([_access(call, action, resource_id=written,
                                  patient=min(owners) if owners else None)])
        body: bytes | None = None
        if resource is not None:
            patient = api.confined_to(principal, type_)
            shown = not (response.status == 200 and action is Action.CREATE
                         and not principal.scopes.permits("read", type_))
            # An If-None-Exist that matched answers a resource the caller did not write:
            # without a read scope it may learn that it exists, not what it says.
            if patient is not None and patient not in api.patients_of(type_, resource):
                shown = False
            if shown:
                body = jsonio.dumps(api.shaped_resource(principal, resource))
        elif document is not None and document.get("resourceType") == "OperationOutcome":
            body = response.body  # Prefer: return=OperationOutcome, as the backend sent it
        if body is None:
            return web.Response(status=response.status, headers=headers)
        return web.Response(status=response.status, body=body, headers=headers,
                            content_type=FHIR_JSON)

    # -- the backend -------------------------------------------------------------------------

    async def _ask(self, call: _Call, method: str, path: str, *,
                   query: Pairs | None = None, body: bytes | None = None,
                   headers: Mapping[str, str] | None = None, idempotent: bool | None = None,
                   cached: Sequence[str] = (), key: Pairs | None = None) -> FhirResponse:
        """One backend call; `cached`: the types a read's answer is about, to serve and
        keep it in the read-through cache (keyed by `key`, else the query)."""
        backend = self.backend
        cache = self.facade.cache_for(backend.name) if cached else None
        sent = query or []
        key = key if key is not None else sent
        ticket: tuple[int, ...] | None = None
        span = trace.get_current_span()
        if cache is not None:
            hit = cache.get(backend.name, method, path, key)
            set_attributes(span, {"forward.backend": backend.name,
                                  "forward.cache": "miss" if hit is None else "hit"})
            if hit is not None:
                return hit
            ticket = cache.ticket(backend.name, cached)
        # Recorded: the backend call's span is a child of this request's span. Not
        # recorded: the caller's traceparent goes on as it came.
        traceparent = (None if call.api.telemetry.recording
                       else call.request.headers.get("traceparent"))
        try:
            response = await backend.request(method, path, query=sent, body=body,
                                             headers=headers, idempotent=idempotent,
                                             traceparent=traceparent)
        except BackendTimeout:
            raise FhirError(504, f"backend {backend.name} did not answer in time; try again "
                            "later", code="timeout") from None
        except BackendUnavailable as exc:
            wait = max(1, math.ceil(exc.retry_after))
            raise FhirError(503, f"backend {backend.name} is unavailable ({exc.reason}); "
                            f"try again in {wait} s", code="transient",
                            headers={"Retry-After": str(wait)}) from None
        if (cache is not None
                and cache.put(backend.name, method, path, key, response, cached, ticket)
                and _is_search(path)):
            _seed_reads(cache, backend.name, response, cached, key)
        return response

    def _invalidate(self, resource_type: str) -> None:
        cache = self.facade.cache_for(self.backend.name)
        if cache is not None:
            cache.invalidate(self.backend.name, resource_type)

    def _resource(self, response: FhirResponse, expected: str | None) -> Json:
        """The answer's resource, normalised by the backend's vendor table; 502 when it
        is not FHIR JSON (or not the type asked for)."""
        try:
            document = jsonio.loads(response.body)
        except ValueError:
            raise self._bad_answer("an answer that is not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("resourceType"), str):
            raise self._bad_answer("an answer that is not a FHIR resource")
        if expected is not None and document["resourceType"] != expected:
            raise self._bad_answer(f"an answer that is not a {expected}")
        normalizer = self.facade.normalizer(self.backend.name)
        return normalizer.apply(document, in_place=True) if normalizer else document

    def _bad_answer(self, what: str) -> FhirError:
        return FhirError(502, f"backend {self.backend.name} sent {what}", code="exception")

    def _refused(self, response: FhirResponse) -> Exception:
        """A backend's refusal as the caller gets it: its status, its OperationOutcome as
        it sent it (ours naming the status if it sent none) and its Retry-After."""
        headers = {}
        retry_after = response.headers.get("Retry-After")
        if retry_after:
            headers["Retry-After"] = retry_after
        if response.status < 400:
            return self._bad_answer(f"an unexpected HTTP {response.status}")
        if response.status in (401, 407):
            # The gateway's own credentials, not the caller's: a 401 passed on would send
            # the caller to renew a token that is fine.
            return FhirError(502, f"backend {self.backend.name} did not accept the "
                             "gateway's credentials", code="exception")
        if _is_outcome(response.body):
            return _Passthrough(web.Response(status=response.status, body=response.body,
                                             headers=headers, content_type=FHIR_JSON))
        return FhirError(response.status, f"backend {self.backend.name} refused the "
                         f"request (HTTP {response.status})", headers=headers)

    def _ours(self, url: str, base: str) -> str | None:
        """A backend URL on our base (a relative one is taken as the backend's); None for a
        URL elsewhere."""
        theirs = self.backend.spec.base_url.rstrip("/")
        if url == theirs or url.startswith((theirs + "/", theirs + "?")):
            return base + url[len(theirs):]
        if "://" not in url and not url.startswith("/"):
            return f"{base}/{url}"
        return None


# -- helpers --------------------------------------------------------------------------------


async def _answered(work: Awaitable[web.Response]) -> web.Response:
    try:
        return await work
    except _Passthrough as passed:
        return passed.response


def _permitted_write(api: FhirApi, type_: str, resource: Json,
                     clauses: Sequence[tuple[Match, ...]]) -> bool:
    """Whether a constrained scope (`?param=value`) covers this resource for a write; a
    constraint that cannot be judged in memory refuses the write (403)."""
    verdict = api.registry.matches(type_, resource, clauses)
    if verdict is None:
        raise FhirError(403, "the granted scope's constraint cannot be checked on a write; "
                        "it needs an unconstrained scope")
    return verdict


# Parameters that make a search answer partial representations: not kept as reads.
_PARTIAL = frozenset({"_summary", "_elements", "_contained", "_containedType"})


def _is_search(path: str) -> bool:
    return "/" not in path or path.endswith("/_search")


def _seed_reads(cache: ReadCache, backend: str, response: FhirResponse,
                types: Sequence[str], query: Pairs) -> None:
    """A search's resources are kept as reads too (the backend's raw resource, as a read
    would answer it): the read that follows a search, such as the record of a caller just
    identified, needs no second round trip. Policy applies to these hits as to any."""
    if any(name.partition(":")[0] in _PARTIAL for name, _ in query):
        return
    try:
        bundle = jsonio.loads(response.body)
    except ValueError:
        return
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": FHIR_JSON})
    for entry in _list(bundle.get("entry") if isinstance(bundle, dict) else None):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        type_, id_ = resource.get("resourceType"), resource.get("id")
        if (not isinstance(type_, str) or type_ not in types or not isinstance(id_, str)
                or _subsetted(resource)):
            continue
        cache.put(backend, "GET", f"{type_}/{id_}", (),
                  FhirResponse(200, headers, jsonio.dumps(resource)), (type_,))


def _subsetted(resource: Json) -> bool:
    meta = resource.get("meta")
    tags = meta.get("tag") if isinstance(meta, dict) else None
    return any(isinstance(t, dict) and t.get("code") == "SUBSETTED" for t in _list(tags))


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _mode(entry: Any) -> str:
    search = entry.get("search") if isinstance(entry, dict) else None
    mode = search.get("mode") if isinstance(search, dict) else None
    return mode if mode in ("match", "include", "outcome") else "match"


def _is_outcome(body: bytes) -> bool:
    try:
        document = jsonio.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("resourceType") == "OperationOutcome"


def _passed_headers(response: FhirResponse, resource: Json | None = None) -> dict[str, str]:
    """ETag and Last-Modified as the backend sent them, else from the resource's meta."""
    headers: CIMultiDict[str] = response.headers
    passed = {name: headers[name] for name in _PASSED_HEADERS if name in headers}
    meta = resource.get("meta") if resource is not None else None
    if isinstance(meta, dict):
        version, updated = meta.get("versionId"), meta.get("lastUpdated")
        if "ETag" not in passed and isinstance(version, str) and _VERSION.fullmatch(version):
            passed["ETag"] = f'W/"{version}"'
        if "Last-Modified" not in passed and isinstance(updated, str):
            moment = _http_date(updated)
            if moment is not None:
                passed["Last-Modified"] = moment
    return passed


def _http_date(instant: str) -> str | None:
    try:
        moment = datetime.fromisoformat(instant.replace("Z", "+00:00"))
    except ValueError:
        return None
    return format_datetime(moment, usegmt=True) if moment.tzinfo is not None else None


def _prefer(call: _Call) -> dict[str, str]:
    prefer = call.request.headers.get("Prefer")
    return {"Prefer": prefer} if prefer else {}


def _if_match_header(call: _Call) -> dict[str, str]:
    version = _if_match(call.request)  # 400 for a malformed one, as locally
    return {"If-Match": f'W/"{version}"'} if version is not None else {}


def _check_condition(call: _Call, pairs: Sequence[tuple[str, str]], where: str) -> None:
    """A conditional write's search, parsed with our table: unknown parameters are
    refused here, as locally, rather than ignored by a lenient backend."""
    try:
        condition(call.api.registry, call.resource_type, pairs)
    except SearchError as exc:
        raise FhirError(400, f"{where}{exc}", exc.param) from None


def _identifier_match(call: _Call, resource: Json) -> Pairs:
    """`identifier=system|value` from the resource's first identifier, so that a create
    can be retried safely (a repeat finds the first); none without system and value."""
    if "identifier" not in call.api.registry.params(call.resource_type):
        return []
    identifiers = resource.get("identifier")
    first = identifiers[0] if isinstance(identifiers, list) and identifiers else identifiers
    if not isinstance(first, dict):
        return []
    system, value = first.get("system"), first.get("value")
    if not (isinstance(system, str) and system and isinstance(value, str) and value):
        return []
    return [("identifier", f"{system.translate(_SEARCH_ESCAPES)}|"
                           f"{value.translate(_SEARCH_ESCAPES)}")]


def _included_types(registry: Any, parsed: ParsedSearch) -> list[str]:
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


def _location_id(location: str, resource_type: str) -> str | None:
    """The id in a Location such as .../Patient/123/_history/1."""
    parts = location.partition("?")[0].rstrip("/").split("/")
    for index in range(len(parts) - 1):
        if parts[index] == resource_type:
            return parts[index + 1]
    return None
