"""`POST /webhooks/{backend}`: a backend's change notification, answered 202 once recorded.

The route knows HTTP: which backend (404 when none, or none with a `webhook`), the body
within its limit (413), the signature (401, on record in the audit trail), the event
readable (400 OperationOutcome), the audit record of the accepted event committed before
the answer (503 when it cannot be), the event recorded (a replay: 200, nothing done). The
fetch and store happen after the answer (`ingest/webhooks.py`). Answers and logs name the
backend and the check, never a value from the event.
"""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.audit.record import Action, AuditRecord
from gateway.edge.audit_http import AUDIT
from gateway.fhir import jsonio
from gateway.fhir.outcome import FHIR_JSON, FhirError, operation_outcome
from gateway.ingest.webhook_events import MalformedEvent
from gateway.ingest.webhooks import Hook, SignatureRefused, Webhooks
from gateway.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

WEBHOOKS = web.AppKey("webhooks", Webhooks)
routes = web.RouteTableDef()


@routes.post("/webhooks/{backend}")
async def receive(request: web.Request) -> web.Response:
    name = request.match_info["backend"]
    webhooks = request.app.get(WEBHOOKS)
    hook = webhooks.hook(name) if webhooks is not None else None
    if webhooks is None or hook is None:
        raise FhirError(404, "no backend of that name sends webhooks here", code="not-found")
    body = await _body(request, hook)
    try:
        hook.signing.verify(request.headers, body)
    except SignatureRefused as exc:
        webhooks.count(hook.backend, "refused")
        await _record(request, hook, "401", f"webhook refused: {exc.reason}", fail_open=True)
        log.warning("webhook from %s refused: %s", hook.backend, exc.reason)
        raise FhirError(401, f"webhook signature refused: {exc.reason}",
                        code="security") from None
    try:
        changed = hook.reader.read(jsonio.loads(body))
    except (ValueError, MalformedEvent) as exc:
        reason = exc.reason if isinstance(exc, MalformedEvent) else "the body is not JSON"
        webhooks.count(hook.backend, "malformed")
        await _record(request, hook, "400", f"webhook malformed: {reason}", fail_open=True)
        raise FhirError(400, f"webhook event refused: {reason}", code="invalid") from None
    if changed is None:  # a kind of event the backend's table says to ignore
        webhooks.count(hook.backend, "ignored")
        return _answer(202, "event accepted; nothing to fetch for its kind")
    await _record(request, hook, "success", f"webhook {changed.kind}",
                  resource_type=changed.resource_type, resource_id=changed.path,
                  control_id=changed.event_id,
                  # A Patient's own record: searchable by patient in the trail.
                  patient=changed.path if changed.resource_type == "Patient" else None)
    try:
        new = await webhooks.record(hook, changed)
    except StoreUnavailable:
        raise FhirError(503, "the event could not be recorded; send it again later",
                        code="transient", headers={"Retry-After": "5"}) from None
    if not new:
        return _answer(200, "event already received")
    return _answer(202, "event accepted")


async def _body(request: web.Request, hook: Hook) -> bytes:
    if request.content_length is not None and request.content_length > hook.max_body_bytes:
        raise FhirError(413, f"a webhook event is at most {hook.max_body_bytes} bytes",
                        code="too-costly")
    chunks: list[bytes] = []
    size = 0
    # Chunked bodies carry no length: read until the end, refusing past the limit.
    while chunk := await request.content.read(65_536):
        size += len(chunk)
        if size > hook.max_body_bytes:
            raise FhirError(413, f"a webhook event is at most {hook.max_body_bytes} bytes",
                            code="too-costly")
        chunks.append(chunk)
    return b"".join(chunks)


async def _record(request: web.Request, hook: Hook, outcome: str, detail: str, *,
                  fail_open: bool = False, resource_type: str = "",
                  resource_id: str | None = None, control_id: str = "",
                  patient: str | None = None) -> None:
    """The event's audit record. An accepted event is refused when it cannot be recorded
    (fail closed); a refusal is answered anyway (it granted nothing), the failure logged."""
    audit = request.app.get(AUDIT)
    if audit is None:
        return
    record = AuditRecord(Action.NOTIFY, outcome, client_id=f"webhook:{hook.backend}",
                         peer=request.remote or "", resource_type=resource_type,
                         resource_id=resource_id, patient=patient,
                         control_id=control_id[:64],
                         detail=detail[:120])
    try:
        await audit.record(record)
    except Exception as exc:  # the trail's failure, whatever its kind
        log.error("webhook from %s: audit record failed: %s", hook.backend,
                  type(exc).__name__)
        if not fail_open:
            raise FhirError(503, "the event could not be put on record; send it again later",
                            code="transient", headers={"Retry-After": "5"}) from None


def _answer(status: int, reason: str) -> web.Response:
    outcome = operation_outcome(status, reason, code="informational", severity="information")
    return web.Response(status=status, body=jsonio.dumps(outcome), content_type=FHIR_JSON)
