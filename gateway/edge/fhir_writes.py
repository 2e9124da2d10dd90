"""Writes answered by the local store: create, update and delete, plain or conditional.
A patient-level scope writes only resources about its own patient, a constrained scope
only what meets its constraint, and what a write replaces must pass the same tests (the
store judges it inside the transaction); creating by update needs `c` as well as `u`.
Every write is recorded."""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

from gateway.audit.record import AuditRecord
from gateway.edge.fhir_api import Call, FhirApi, Outcomes
from gateway.edge.fhir_request import (
    ACTIONS,
    INTERACTIONS,
    REASONS,
    access,
    http_date,
    if_match,
    prefer_return,
    read_body,
    resource_answer,
    validated,
)
from gateway.events.subscriptions import SubscriptionError
from gateway.fhir.outcome import FHIR_JSON, FhirError, information
from gateway.fhir.search import SearchError
from gateway.fhir.transaction import Entry, query_pairs, write_request
from gateway.policy.principal import Principal
from gateway.store.fhir import (
    Match,
    Refusal,
    ReplaceCheck,
    SearchQuery,
    StoredResource,
    WriteConflict,
    WriteOutcome,
    WriteRequest,
)


async def create(call: Call) -> web.Response:
    request = call.request
    resource = await read_body(request, call.api.limits.max_body_bytes)
    validated(resource, call.resource_type)
    resource = _subscription(call, resource)
    resource.pop("id", None)  # FHIR R4 http.html#create: the server assigns the id
    condition = request.headers.get("If-None-Exist")
    entry = Entry(0, "POST", call.resource_type, None, (), resource, None, None,
                  query_pairs(condition) if condition else (), call.resource_type)
    return await _write(call, entry)


async def update(call: Call) -> web.Response:
    request = call.request
    id_ = request.match_info["id"]
    resource = await read_body(request, call.api.limits.max_body_bytes)
    validated(resource, call.resource_type)
    resource = _subscription(call, resource)
    if resource.get("id") != id_:
        raise FhirError(400, "the resource id must match the id in the URL",
                        f"{call.resource_type}.id")
    entry = Entry(0, "PUT", call.resource_type, id_, (), resource, None,
                  if_match(request), (), f"{call.resource_type}/{id_}")
    return await _write(call, entry)


async def conditional_update(call: Call) -> web.Response:
    request = call.request
    params = tuple(request.query.items())
    if not params:
        raise FhirError(400, "a conditional update needs search parameters")
    resource = await read_body(request, call.api.limits.max_body_bytes)
    validated(resource, call.resource_type)
    resource = _subscription(call, resource)
    entry = Entry(0, "PUT", call.resource_type, None, params, resource, None,
                  if_match(request), (), call.resource_type)
    return await _write(call, entry)


def _subscription(call: Call, resource: dict[str, Any]) -> dict[str, Any]:
    return owned_subscription(call.api, call.principal, call.resource_type, resource)


def owned_subscription(api: FhirApi, principal: Principal, resource_type: str,
                       resource: dict[str, Any]) -> dict[str, Any]:
    """A Subscription as the gateway stores it (checked, its status and owner set: the
    writing caller, alone or in a Bundle): the events package decides what it can act
    on; 400 or 403 when it cannot. Other types pass as they are."""
    rules = api.subscriptions
    if resource_type != "Subscription" or rules is None:
        return resource
    try:
        return rules.accept(resource, principal)
    except SubscriptionError as exc:
        raise FhirError(exc.status, exc.reason, exc.element) from None


async def delete(call: Call) -> web.Response:
    request = call.request
    id_ = request.match_info["id"]
    entry = Entry(0, "DELETE", call.resource_type, id_, (), None, None, if_match(request),
                  (), f"{call.resource_type}/{id_}")
    return await _write(call, entry)


async def conditional_delete(call: Call) -> web.Response:
    request = call.request
    params = tuple(request.query.items())
    if not params:
        raise FhirError(400, "a conditional delete needs search parameters")
    entry = Entry(0, "DELETE", call.resource_type, None, params, None, None, None, (),
                  call.resource_type)
    return await _write(call, entry)


async def _write(call: Call, entry: Entry) -> web.Response:
    api = call.api
    interaction = INTERACTIONS[entry.method]
    api.authorize(call.principal, interaction, entry.resource_type)
    write = await checked_write(call, entry, "")
    attempt = access(call, ACTIONS[entry.method])  # here: it carries the request's trace

    def records(outcomes: Outcomes) -> list[AuditRecord]:
        [outcome] = outcomes  # atomic: a conflict is raised, not returned
        assert isinstance(outcome, WriteOutcome)
        return [written(api, attempt, entry, outcome)]

    try:
        # On record before it is committed: a 503 here means nothing was written.
        [result] = await api.transact([write], records)
    except WriteConflict as conflict:
        await api.record([access(call, ACTIONS[entry.method], str(conflict.status),
                                 resource_id=target(entry))])
        raise FhirError(conflict.status, conflict_reason(conflict)) from None
    assert isinstance(result, WriteOutcome)
    stored = result.stored
    if stored is None or entry.method == "DELETE":
        return web.Response(status=204)
    base = api.base(call.request)
    location = f"{base}/{stored.resource_type}/{stored.id}/_history/{stored.version}"
    prefer = prefer_return(call.request)
    if not result.changed and not call.principal.scopes.permits("read", stored.resource_type):
        # A matched If-None-Exist answers a resource the caller did not write: without a
        # read scope it may learn that it exists, not what it says.
        prefer = "minimal"
    if prefer == "minimal":
        response = web.Response(status=result.status)
    elif prefer == "OperationOutcome":
        response = web.Response(body=orjson.dumps(information(
            f"{entry.method} {REASONS.get(result.status, '')}".strip())),
            status=result.status, content_type=FHIR_JSON)
    else:
        return resource_answer(stored, api.shaped(call.principal, stored), result.status,
                               location if result.status == 201 else None)
    response.headers["ETag"] = f'W/"{stored.version}"'
    response.headers["Last-Modified"] = http_date(stored.last_updated)
    if result.status == 201:
        response.headers["Location"] = location
    return response


def written(api: FhirApi, attempt: AuditRecord, entry: Entry,
            result: WriteOutcome) -> AuditRecord:
    """The record of one applied write: what it wrote and whose compartment holds it."""
    stored = result.stored
    patients: set[str] = set()
    if stored is not None and not stored.deleted:
        patients = api.patients_of(stored.resource_type, orjson.loads(stored.body))
    return attempt._replace(
        resource_type=entry.resource_type,
        resource_id=f"{stored.resource_type}/{stored.id}" if stored else target(entry),
        patient=min(patients) if patients else None)


def target(entry: Entry) -> str | None:
    return f"{entry.resource_type}/{entry.id}" if entry.id else None


_STORE_ENTRY = re.compile(r"^entry \d+: ")


def conflict_reason(conflict: WriteConflict) -> str:
    """The store's reason without its 'entry N: ' prefix: N counts the writes handed to
    the store, not the Bundle's entries, so the edge names the entry itself (or none)."""
    return _STORE_ENTRY.sub("", conflict.reason, count=1)


async def checked_write(call: Call, entry: Entry, where: str) -> WriteRequest:
    """The store write for an entry: what it writes checked here, what it replaces judged
    by the store inside the transaction (`_replace_check`), a conditional write's search
    cut to what the caller may see."""
    api, principal, type_ = call.api, call.principal, entry.resource_type
    interaction = INTERACTIONS[entry.method]
    try:
        write = write_request(api.registry, entry)
    except SearchError as exc:
        raise FhirError(400, f"{where}{exc}", exc.param) from None
    constraints = api.scope_clauses(principal, interaction, type_)
    patient = api.confined_to(principal, type_)
    if entry.resource is not None:
        if constraints and not _meets(call, type_, entry.resource, constraints):
            raise FhirError(403, f"{where}the granted scope does not permit writing this "
                            f"{type_}")
        if patient is not None and not api.only_about(type_, entry.resource, patient):
            raise FhirError(403, f"{where}a patient-level scope may only write resources "
                            "about its own patient (every subject or patient reference "
                            "names it)")
    resource, clauses = write.resource, write.condition.clauses if write.condition else ()
    if write.condition is not None:
        # A conditional write only finds what the caller may see (If-None-Exist too: a
        # match outside it would be answered with another patient's resource).
        clauses = (*clauses, *constraints)
        if patient is not None:
            clauses = (*clauses, api.compartment_clause(type_, patient))
            if write.method == "PUT" and resource is not None:
                # A conditional update that creates takes a server id: a client-chosen
                # one could collide with another patient's resource and say so (409).
                resource = {k: v for k, v in resource.items() if k != "id"}
    check = _replace_check(call, entry, constraints, patient) \
        if write.method != "POST" else None
    return WriteRequest(write.method, write.resource_type, write.id, resource,
                        SearchQuery(type_, clauses) if write.condition is not None else None,
                        write.if_match, write.full_url, check)


def _replace_check(call: Call, entry: Entry, constraints: tuple[tuple[Match, ...], ...],
                   patient: str | None) -> ReplaceCheck:
    """How the store judges what a PUT or DELETE replaces, inside its transaction: what
    the caller may not read answers 404 as a read does; what it may read but not change
    (a confined caller and a resource also about another patient) 403; a PUT that would
    create needs the create permission as well (SMART v2: `u` updates, `c` creates)."""
    api, type_ = call.api, entry.resource_type
    by_id = entry.id is not None
    may_create = call.principal.scopes.permits("create", type_)
    unknown = f"no {type_} with this id is known"

    def check(current: StoredResource | None) -> Refusal | None:
        if current is None or current.deleted:
            if patient is not None and by_id:
                # An unknown id answers like another patient's (no delete of nothing,
                # no update-as-create): otherwise the answer would tell which ids exist.
                return 404, unknown
            if entry.method == "PUT" and not may_create:
                return 403, (f"creating a {type_} by update needs a scope that permits "
                             "create (c) as well as update (u)")
            return None
        resource = orjson.loads(current.body)
        if constraints:
            verdict = api.registry.matches(type_, resource, constraints)
            if verdict is None:
                return 403, _UNJUDGED
            if not verdict:
                return 404, unknown
        if patient is not None:
            if not api.in_compartment(type_, resource, patient):
                return 404, unknown
            if not api.only_about(type_, resource, patient):
                return 403, ("a patient-level scope may only change resources about its "
                             "own patient")
        return None

    return check


_UNJUDGED = ("the granted scope's constraint cannot be checked on a write; it needs an "
             "unconstrained scope")


def _meets(call: Call, type_: str, resource: dict[str, Any],
           constraints: tuple[tuple[Match, ...], ...]) -> bool:
    """Whether a resource written under a scope granted with `?param=value` (e.g.
    Observation.cu?category=laboratory) meets it; 403 when it cannot be judged."""
    verdict = call.api.registry.matches(type_, resource, constraints)
    if verdict is None:
        raise FhirError(403, _UNJUDGED)
    return verdict
