"""Batch and transaction Bundles, answered by the local store: every entry checked as
its own request would be (a transaction is refused whole, before any write), the writes
made in one store transaction, each entry answered and recorded."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web

from gateway.audit.record import AuditRecord
from gateway.edge.fhir_api import Call, FhirApi, Outcomes
from gateway.edge.fhir_reads import readable
from gateway.edge.fhir_request import (
    ACTIONS,
    INTERACTIONS,
    REASONS,
    access,
    bundle,
    read_body,
    served_here,
    validated,
)
from gateway.edge.fhir_search import search
from gateway.edge.fhir_writes import (
    checked_write,
    conflict_reason,
    owned_subscription,
    target,
    written,
)
from gateway.fhir.outcome import FhirError, operation_outcome
from gateway.fhir.transaction import Entry, parse_bundle
from gateway.policy.principal import Principal
from gateway.store.fhir import WriteConflict, WriteOutcome, WriteRequest


async def batch_or_transaction(call: Call) -> web.Response:
    """POST of a batch or transaction Bundle to the base."""
    request, api = call.request, call.api
    document = await read_body(request, api.limits.max_body_bytes)
    if document.get("resourceType") != "Bundle":
        raise FhirError(400, "POST to the base takes a batch or transaction Bundle",
                        "Bundle.resourceType")
    kind, entries = parse_bundle(document, api.limits.max_bundle_entries)
    atomic = kind == "transaction"
    answers: list[bytes | None] = [None] * len(entries)
    writes: list[tuple[Entry, WriteRequest]] = []
    for entry in entries:
        if entry.method == "GET" and not atomic:
            continue  # a batch answers each read in its own entry
        where = f"Bundle.entry[{entry.index}]: "
        try:
            api.check_type(entry.resource_type)
            served_here(api, entry.resource_type, INTERACTIONS.get(
                entry.method, "read" if entry.id else "search"))
            if entry.method == "GET":
                # A transaction is refused whole, before any write, for a read it may
                # not make either.
                api.authorize(call.principal, "read" if entry.id else "search",
                              entry.resource_type)
                continue
            api.authorize(call.principal, INTERACTIONS[entry.method], entry.resource_type)
            if entry.resource is not None:
                validated(entry.resource, entry.resource_type,
                          f"Bundle.entry[{entry.index}].resource")
                # A Subscription is owned by the Bundle's caller, as if written alone.
                entry = replace(entry, resource=owned_subscription(
                    api, call.principal, entry.resource_type, entry.resource))
            writes.append((entry, await checked_write(call, entry, where)))
        except FhirError as exc:
            if atomic:
                raise FhirError(exc.status, exc.reason if exc.reason.startswith("Bundle")
                                else where + exc.reason, exc.expression) from None
            answers[entry.index] = _error_entry(exc.status, exc.reason)
    attempt = access(call, ACTIONS["POST"])  # here: it carries the request's trace

    def records(outcomes: Outcomes) -> list[AuditRecord]:
        made = []
        for (entry, _), result in zip(writes, outcomes, strict=True):
            action = ACTIONS[entry.method]
            if isinstance(result, WriteConflict):
                made.append(attempt._replace(action=action, outcome=str(result.status),
                                             resource_type=entry.resource_type,
                                             resource_id=target(entry)))
            else:
                made.append(written(api, attempt._replace(action=action), entry, result))
        return made

    outcomes: Outcomes = []
    if writes:
        try:
            # On record before it is committed: a 503 here means nothing was written.
            outcomes = await api.transact([w for _, w in writes], records, atomic=atomic)
        except WriteConflict as conflict:
            index = writes[conflict.entry][0].index if conflict.entry is not None else None
            raise FhirError(conflict.status, (f"Bundle.entry[{index}]: " if index is not None
                                              else "") + conflict_reason(conflict)
                             ) from None
    base = api.base(request)
    for (entry, _), result in zip(writes, outcomes, strict=True):
        if isinstance(result, WriteConflict):
            answers[entry.index] = _error_entry(result.status, conflict_reason(result))
        else:
            answers[entry.index] = _write_entry(api, call.principal, base, result)
    for entry in entries:
        if entry.method == "GET":
            answers[entry.index] = await _get_entry(call, entry)
    return bundle(f"{kind}-response", [a or b"{}" for a in answers], [], None)


def _write_entry(api: FhirApi, principal: Principal, base: str,
                 result: WriteOutcome) -> bytes:
    stored = result.stored
    response: dict[str, Any] = {"status": f"{result.status} {REASONS.get(result.status, '')}"
                                .strip()}
    if stored is None:
        return b'{"response":' + orjson.dumps(response) + b"}"
    response["location"] = f"{stored.resource_type}/{stored.id}/_history/{stored.version}"
    response["etag"] = f'W/"{stored.version}"'
    response["lastModified"] = stored.last_updated
    if not result.changed and not principal.scopes.permits("read", stored.resource_type):
        return b'{"response":' + orjson.dumps(response) + b"}"  # as in fhir_writes
    return b"".join((b'{"fullUrl":', orjson.dumps(f"{base}/{stored.resource_type}/"
                                                  f"{stored.id}"),
                     b',"resource":', api.shaped(principal, stored),
                     b',"response":', orjson.dumps(response), b"}"))


def _error_entry(status: int, reason: str) -> bytes:
    return orjson.dumps({"response": {
        "status": f"{status} {REASONS.get(status, '')}".strip(),
        "outcome": operation_outcome(status, reason)}})


async def _get_entry(call: Call, entry: Entry) -> bytes:
    """A GET inside a batch: a read or a search, answered like its own request."""
    sub = Call(call.api, call.request, call.principal,
               "read" if entry.id else "search", entry.resource_type)
    try:
        call.api.check_type(entry.resource_type)
        served_here(call.api, entry.resource_type, sub.interaction)
        if entry.id is not None:
            stored = await readable(sub, entry.id)
            body = call.api.shaped(call.principal, stored)
            return b"".join((b'{"resource":', body, b',"response":', orjson.dumps({
                "status": "200 OK", "etag": f'W/"{stored.version}"',
                "lastModified": stored.last_updated}), b"}"))
        response = await search(sub, list(entry.params))
        assert isinstance(response.body, bytes)
        return b'{"resource":' + response.body + b',"response":{"status":"200 OK"}}'
    except FhirError as exc:
        return _error_entry(exc.status, exc.reason)
