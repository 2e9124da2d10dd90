"""Writes proxied to a remote FHIR backend: the body checked by the same guard and
validation as locally, what is written (and what it replaces) held to the caller's
compartment and scope constraint, a conditional write's search narrowed to what the
caller may see, the answer recorded, cut for the caller and moved to our base."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from urllib.parse import quote, urlencode

from aiohttp import web

from gateway.audit.record import Action
from gateway.edge.fhir_api import Call, FhirApi, Pairs
from gateway.edge.fhir_proxy_backend import BackendLink, Json, as_list, passed_headers
from gateway.edge.fhir_proxy_search import compartment_pairs, constraint_pairs
from gateway.edge.fhir_request import access, if_match, read_body, unknown, validated
from gateway.fhir import jsonio
from gateway.fhir.escaping import token
from gateway.fhir.outcome import FHIR_JSON, FhirError
from gateway.fhir.search import SearchError
from gateway.fhir.transaction import condition, query_pairs
from gateway.forward.backend import FhirResponse
from gateway.store.fhir import Match

log = logging.getLogger(__name__)
# Recorded before a write is sent to a backend; its outcome follows in a record of its own.
PENDING = "pending"


async def create(link: BackendLink, call: Call) -> web.Response:
    api, type_ = call.api, call.resource_type
    api.authorize(call.principal, "create", type_)
    resource = await read_body(call.request, api.limits.max_body_bytes)
    validated(resource, type_)
    resource.pop("id", None)  # FHIR R4 http.html#create: the server assigns the id
    _check_written(call, "create", resource)
    given = call.request.headers.get("If-None-Exist")
    match = list(query_pairs(given)) if given else _identifier_match(call, resource)
    headers = {"Content-Type": FHIR_JSON, **_prefer(call)}
    if match:
        _check_condition(call, match, "If-None-Exist: ")
        # A match outside the caller's compartment would answer another patient's.
        match += _narrowing(call, "create")
        headers["If-None-Exist"] = urlencode(match, safe="/:|", quote_via=quote)
    # With If-None-Exist a repeat finds what the first made: safe to retry; without,
    # a lost answer could mean a second resource, so it is sent once.
    await _on_record_first(call, Action.CREATE, None)
    response = await link.ask(call, "POST", type_, body=jsonio.dumps(resource),
                              headers=headers, idempotent=bool(match))
    link.invalidate(type_)
    return await _written(link, call, response, Action.CREATE, resource, None)


async def update(link: BackendLink, call: Call) -> web.Response:
    api, type_ = call.api, call.resource_type
    id_ = call.request.match_info["id"]
    api.authorize(call.principal, "update", type_)
    resource = await read_body(call.request, api.limits.max_body_bytes)
    validated(resource, type_)
    if resource.get("id") != id_:
        raise FhirError(400, "the resource id must match the id in the URL",
                        f"{type_}.id")
    _check_written(call, "update", resource)
    await _check_current(link, call, "update", id_)
    headers = {"Content-Type": FHIR_JSON, **_prefer(call), **_if_match_header(call)}
    await _on_record_first(call, Action.UPDATE, f"{type_}/{id_}")
    response = await link.ask(call, "PUT", f"{type_}/{id_}", body=jsonio.dumps(resource),
                              headers=headers)
    link.invalidate(type_)
    return await _written(link, call, response, Action.UPDATE, resource, f"{type_}/{id_}")


async def conditional_update(link: BackendLink, call: Call) -> web.Response:
    api, type_ = call.api, call.resource_type
    params = list(call.request.query.items())
    if not params:
        raise FhirError(400, "a conditional update needs search parameters")
    api.authorize(call.principal, "update", type_)
    resource = await read_body(call.request, api.limits.max_body_bytes)
    validated(resource, type_)
    _check_condition(call, params, "")
    _check_written(call, "update", resource)
    narrowing = _narrowing(call, "update")
    await _check_matched(link, call, "update", params + narrowing)
    if api.confined_to(call.principal, type_) is not None:
        # A conditional update that creates takes a server id: a client-chosen one
        # could collide with another patient's resource and say so.
        resource.pop("id", None)
    headers = {"Content-Type": FHIR_JSON, **_prefer(call), **_if_match_header(call)}
    await _on_record_first(call, Action.UPDATE, None)
    response = await link.ask(call, "PUT", type_, query=params + narrowing,
                              body=jsonio.dumps(resource), headers=headers)
    link.invalidate(type_)
    return await _written(link, call, response, Action.UPDATE, resource, None)


async def delete(link: BackendLink, call: Call) -> web.Response:
    type_ = call.resource_type
    id_ = call.request.match_info["id"]
    call.api.authorize(call.principal, "delete", type_)
    await _check_current(link, call, "delete", id_)
    await _on_record_first(call, Action.DELETE, f"{type_}/{id_}")
    response = await link.ask(call, "DELETE", f"{type_}/{id_}",
                              headers=_if_match_header(call))
    link.invalidate(type_)
    return await _written(link, call, response, Action.DELETE, None, f"{type_}/{id_}")


async def conditional_delete(link: BackendLink, call: Call) -> web.Response:
    type_ = call.resource_type
    params = list(call.request.query.items())
    if not params:
        raise FhirError(400, "a conditional delete needs search parameters")
    call.api.authorize(call.principal, "delete", type_)
    _check_condition(call, params, "")
    narrowing = _narrowing(call, "delete")
    await _check_matched(link, call, "delete", params + narrowing)
    await _on_record_first(call, Action.DELETE, None)
    response = await link.ask(call, "DELETE", type_, query=params + narrowing)
    link.invalidate(type_)
    return await _written(link, call, response, Action.DELETE, None, None)


async def _on_record_first(call: Call, action: Action, target: str | None) -> None:
    """A backend's write cannot be rolled back from here, so it is on record before it is
    sent (outcome `pending`; one that cannot be recorded is not sent: 503, nothing
    written) and its outcome is recorded once the backend answers."""
    await call.api.record([access(call, action, PENDING, resource_id=target)])


def _check_written(call: Call, interaction: str, resource: Json) -> None:
    """What is written must meet the scope's constraint and lie in the caller's
    compartment (403), as for the local store."""
    api, type_ = call.api, call.resource_type
    clauses = api.scope_clauses(call.principal, interaction, type_)
    if clauses and not _permitted_write(api, type_, resource, clauses):
        raise FhirError(403, f"the granted scope does not permit writing this {type_}")
    patient = api.confined_to(call.principal, type_)
    if patient is not None and not api.only_about(type_, resource, patient):
        raise FhirError(403, "a patient-level scope may only write resources about its "
                        "own patient (every subject or patient reference names it)")


def _limits(call: Call, interaction: str
            ) -> tuple[str | None, Sequence[tuple[Match, ...]], bool] | None:
    """What limits the caller's write of this type: its patient (if confined), the
    constraints of its scope, and whether it may create; None when nothing does, so the
    version being replaced need not be fetched at all."""
    api, type_ = call.api, call.resource_type
    patient = api.confined_to(call.principal, type_)
    clauses = api.scope_clauses(call.principal, interaction, type_)
    may_create = interaction != "update" or call.principal.scopes.permits("create", type_)
    if patient is None and not clauses and may_create:
        return None
    return patient, clauses, may_create


async def _check_current(link: BackendLink, call: Call, interaction: str, id_: str) -> None:
    """What an update or delete replaces, held to the same tests as the local store's
    (`fhir_writes._replace_check`): fetched fresh (never from the cache) when a
    compartment or a constraint limits the caller, or an update could create without
    the create permission. An unknown id answers a confined caller the same 404 as
    another patient's."""
    limits = _limits(call, interaction)
    if limits is None:
        return
    patient, clauses, may_create = limits
    type_ = call.resource_type
    response = await link.ask(call, "GET", f"{type_}/{id_}")
    if response.status in (404, 410):
        if patient is not None:
            raise unknown(type_)
        if not may_create:
            raise _no_create(type_)
        return
    if response.status != 200:
        raise link.refused(response)
    _check_replaced(call, link.resource(response, type_), clauses, patient, unknown(type_))


async def _check_matched(link: BackendLink, call: Call, interaction: str,
                         query: Pairs) -> None:
    """What a conditional update or delete would replace, found by the same search
    the backend is about to run (fresh, not cached): held to the same tests; a
    conditional update matching nothing creates, which needs the create permission.
    The backend resolves the condition again; a change in between is the backend's."""
    limits = _limits(call, interaction)
    if limits is None:
        return
    patient, clauses, may_create = limits
    type_ = call.resource_type
    response = await link.ask(call, "GET", type_, query=[*query, ("_count", "2")])
    if response.status != 200:
        raise link.refused(response)
    found = [entry["resource"] for entry in as_list(link.resource(response, "Bundle")
                                                    .get("entry"))
             if isinstance(entry, dict) and isinstance(entry.get("resource"), dict)
             and entry["resource"].get("resourceType") == type_]
    if not found and not may_create:
        raise _no_create(type_)
    refusal = FhirError(403, f"the condition finds a {type_} this scope may not change")
    for current in found:
        _check_replaced(call, current, clauses, patient, refusal)


def _check_replaced(call: Call, current: Json, clauses: Sequence[tuple[Match, ...]],
                    patient: str | None, hidden: FhirError) -> None:
    """A version a write would replace: `hidden` if the caller may not see it, 403 if
    it may see it but not change it (a confined caller, a resource about others too)."""
    api, type_ = call.api, call.resource_type
    if clauses and not _permitted_write(api, type_, current, clauses):
        raise hidden
    if patient is not None and not api.in_compartment(type_, current, patient):
        raise hidden
    if patient is not None and not api.only_about(type_, current, patient):
        raise FhirError(403, "a patient-level scope may only change resources about its "
                        "own patient")


def _no_create(type_: str) -> FhirError:
    return FhirError(403, f"creating a {type_} by update needs a scope that permits "
                     "create (c) as well as update (u)")


def _narrowing(call: Call, interaction: str) -> Pairs:
    """Parameters a conditional write's search gets so it finds only what the caller
    may see: the compartment, and the scope's constraint (403 if it cannot be sent)."""
    type_ = call.resource_type
    pairs, sent_on = constraint_pairs(call, interaction, type_)
    if not sent_on:
        raise FhirError(403, "the granted scopes' constraints are too complex to apply "
                        "to a conditional write")
    patient = call.api.confined_to(call.principal, type_)
    if patient is not None:
        pairs += compartment_pairs(call, type_, patient)
    return pairs


async def _written(link: BackendLink, call: Call, response: FhirResponse, action: Action,
                   sent: Json | None, target: str | None) -> web.Response:
    """A write's answer: recorded, its representation normalised and cut for the
    caller, its Location on our base."""
    api, principal, type_ = call.api, call.principal, call.resource_type
    if response.status >= 400:
        # Recorded by the error middleware, as every refusal a backend causes is.
        raise link.refused(response)
    if not 200 <= response.status < 300:
        raise link.bad_answer(f"HTTP {response.status}")
    base = api.base(call.request)
    # The write is done: a representation that is not valid R4 is passed (and counted),
    # never answered 502, which would invite the caller to write again.
    document = (link.resource(response, None, refuse_invalid=False)
                if response.body.strip() else None)
    resource = document if document and document.get("resourceType") == type_ else None
    headers = passed_headers(response, resource)
    location = response.headers.get("Location")
    if location:
        ours = link.ours(location, base)
        if ours is not None:
            headers["Location"] = ours
    id_ = resource.get("id") if resource is not None else None
    if not isinstance(id_, str) and location:
        id_ = _location_id(location, type_)
    written = f"{type_}/{id_}" if isinstance(id_, str) and id_ else target
    owners = api.patients_of(type_, resource if resource is not None else sent or {})
    try:
        await api.record([access(call, action, resource_id=written,
                                 patient=min(owners) if owners else None)])
    except FhirError:
        # The backend has written it and its `pending` record is kept: answering 503 now
        # would say nothing was written and invite a duplicate.
        log.error("the outcome of a proxied %s could not be recorded; its pending record "
                  "is on file", action)
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


def _permitted_write(api: FhirApi, type_: str, resource: Json,
                     clauses: Sequence[tuple[Match, ...]]) -> bool:
    """Whether a constrained scope (`?param=value`) covers this resource for a write; a
    constraint that cannot be judged in memory refuses the write (403)."""
    verdict = api.registry.matches(type_, resource, clauses)
    if verdict is None:
        raise FhirError(403, "the granted scope's constraint cannot be checked on a write; "
                        "it needs an unconstrained scope")
    return verdict


def _prefer(call: Call) -> dict[str, str]:
    prefer = call.request.headers.get("Prefer")
    return {"Prefer": prefer} if prefer else {}


def _if_match_header(call: Call) -> dict[str, str]:
    version = if_match(call.request)  # 400 for a malformed one, as locally
    return {"If-Match": f'W/"{version}"'} if version is not None else {}


def _check_condition(call: Call, pairs: Sequence[tuple[str, str]], where: str) -> None:
    """A conditional write's search, parsed with our table: unknown parameters are
    refused here, as locally, rather than ignored by a lenient backend."""
    try:
        condition(call.api.registry, call.resource_type, pairs)
    except SearchError as exc:
        raise FhirError(400, f"{where}{exc}", exc.param) from None


def _identifier_match(call: Call, resource: Json) -> Pairs:
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
    return [("identifier", token(system, value))]


def _location_id(location: str, resource_type: str) -> str | None:
    """The id in a Location such as .../Patient/123/_history/1."""
    parts = location.partition("?")[0].rstrip("/").split("/")
    for index in range(len(parts) - 1):
        if parts[index] == resource_type:
            return parts[index + 1]
    return None
