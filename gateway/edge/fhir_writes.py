"""Writes answered by the local store: create, update and delete, plain or conditional.
A patient-level scope writes only in its patient's compartment, a constrained scope only
what meets its constraint (and what it replaces must too); every write is recorded."""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

from gateway.audit import AuditRecord
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
from gateway.fhir.outcome import FHIR_JSON, FhirError, information
from gateway.fhir.search import SearchError
from gateway.fhir.transaction import Entry, query_pairs, write_request
from gateway.store.fhir import Match, SearchQuery, WriteConflict, WriteOutcome, WriteRequest


async def create(call: Call) -> web.Response:
    request = call.request
    resource = await read_body(request, call.api.limits.max_body_bytes)
    validated(resource, call.resource_type)
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
    entry = Entry(0, "PUT", call.resource_type, None, params, resource, None,
                  if_match(request), (), call.resource_type)
    return await _write(call, entry)


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
    """The store write for an entry, after the compartment checks a patient scope needs."""
    api = call.api
    interaction = INTERACTIONS[entry.method]
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


async def _constrained(call: Call, entry: Entry, write: WriteRequest,
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
