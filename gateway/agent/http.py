"""The agent API's routes under /agent/v1: who calls (an agent client holding the
`agent` scope), at what rate, with which session, retried under which Idempotency-Key;
every answer JSON, every refusal `{error, message}` (turned into one here, in
`_answer`), every call an audit record committed before the answer leaves.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry import trace

import gateway.agent.requests as requests
from gateway.agent.errors import (
    AgentError,
    AuditUnavailable,
    Forbidden,
    IdempotencyConflict,
    InvalidRequest,
    InvalidSession,
    RateLimited,
    Unauthenticated,
)
from gateway.agent.openapi import DOCUMENT
from gateway.agent.service import AgentService
from gateway.agent.sessions import Answer, Idempotency, Session
from gateway.audit.log import AuditLog
from gateway.audit.record import Action, AuditRecord
from gateway.edge.auth import principal_for
from gateway.edge.errors import AuthError
from gateway.fhir import jsonio
from gateway.forward.errors import RateLimited as BucketEmpty
from gateway.forward.resilience import TokenBucket
from gateway.policy.principal import Principal
from gateway.telemetry import Telemetry, set_attributes

log = logging.getLogger(__name__)

PREFIX = "/agent/v1"
SESSION_HEADER = "X-Session-Token"
IDEMPOTENCY_HEADER = "Idempotency-Key"
AGENT_SCOPE = "agent"
_MAX_BODY = 16 * 1024
_KEY_CHARS = 255


@dataclass
class AgentApi:
    """What the routes need: the service, who may call, the limits and the audit log."""

    service: AgentService
    telemetry: Telemetry
    agent_clients: frozenset[str]
    idempotency: Idempotency
    rate: tuple[float, float] | None = None
    audit: AuditLog | None = None
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)

    async def admit(self, client_id: str) -> None:
        """Take one of the client's tokens now, or RateLimited (an agent never waits)."""
        if self.rate is None:
            return
        bucket = self._buckets.get(client_id)
        if bucket is None:
            bucket = self._buckets[client_id] = TokenBucket(*self.rate)
        try:
            await bucket.acquire(max_wait=0.0)
        except BucketEmpty as exc:
            raise RateLimited(exc.retry_after) from None


AGENT = web.AppKey("agent_api", AgentApi)
routes = web.RouteTableDef()


@dataclass
class _Call:
    """One request as the audit record and span describe it (no PHI but the patient
    reference, which the audit log encrypts)."""

    operation: str
    action: Action
    resource_type: str
    client_id: str = ""
    call_id: str = ""
    purpose: str = ""
    patient: str | None = None
    detail: str = ""


Work = Callable[[web.Request, "AgentApi", Principal, _Call, Any], Awaitable[tuple[int, Any]]]


def _route(operation: str, action: Action, resource_type: str, *, session: bool = True
           ) -> Callable[[Work], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """A handler: authenticate, limit, find the session, run `work`, audit, answer."""

    def wrap(work: Work) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            api = request.app[AGENT]
            call = _Call(operation, action, resource_type)
            with api.telemetry.tracer.start_as_current_span("agent.request",
                                                            kind=trace.SpanKind.SERVER) as span:
                status, body, headers = await _handle(request, api, call, work, session)
                set_attributes(span, {"agent.operation": operation,
                                      "agent.purpose": call.purpose,
                                      "http.response.status_code": status})
            return web.Response(status=status, body=body, headers=headers,
                                content_type="application/json")

        return handler

    return wrap


async def _handle(request: web.Request, api: AgentApi, call: _Call, work: Work,
                  needs_session: bool) -> tuple[int, bytes, dict[str, str]]:
    try:
        principal = await _principal(request, api)
        call.client_id = principal.client_id
        await api.admit(principal.client_id)
        session = _session(request, api, principal) if needs_session else None
        if session is not None:
            call.call_id, call.purpose, call.patient = (session.call_id, session.purpose,
                                                        session.patient)
        status, body = await _idempotent(request, api, principal, call, work, session)
    except AgentError as exc:
        await _record_refusal(api, call, str(exc.status), exc.code)
        return exc.status, jsonio.dumps(exc.body()), exc.headers
    except AuthError as exc:
        code = "unauthorized" if exc.status == 401 else "forbidden"
        await _record_refusal(api, call, str(exc.status), code)
        headers = {"WWW-Authenticate": exc.www_authenticate} if exc.www_authenticate else {}
        return exc.status, jsonio.dumps({"error": code, "message": exc.reason}), headers
    except Exception as exc:  # a bug costs this call a 500, never the process
        log.error("agent API %s failed: %s", call.operation, type(exc).__name__)
        return 500, jsonio.dumps({"error": "internal_error",
                                  "message": "the gateway could not answer"}), {}
    return status, body, {}


async def _principal(request: web.Request, api: AgentApi) -> Principal:
    principal = await principal_for(request)
    if principal.client_id not in api.agent_clients:
        raise Forbidden(f"this client does not hold the '{AGENT_SCOPE}' scope")
    return principal


def _session(request: web.Request, api: AgentApi, principal: Principal) -> Session:
    token = request.headers.get(SESSION_HEADER, "").strip()
    if not token:
        raise Unauthenticated(f"the {SESSION_HEADER} header is required")
    session = api.service.sessions.get(token, principal.client_id)
    if session is None:
        raise InvalidSession()
    return session


async def _idempotent(request: web.Request, api: AgentApi, principal: Principal,
                      call: _Call, work: Work, session: Session | None) -> tuple[int, bytes]:
    body = await _body(request) if request.method == "POST" else None
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if request.method != "POST" or key is None:
        status, answer = await _run(request, api, principal, call, work, body, session)
        return status, answer
    if not key or len(key) > _KEY_CHARS:
        raise InvalidRequest(f"{IDEMPOTENCY_HEADER} must be 1 to {_KEY_CHARS} characters")
    fingerprint = hashlib.sha256(
        f"{request.path}\x1f{request.headers.get(SESSION_HEADER, '')}\x1f".encode()
        + (await request.read())).hexdigest()
    try:
        future, first = api.idempotency.claim(principal.client_id, key, fingerprint)
    except ValueError:
        raise IdempotencyConflict() from None
    if not first:
        try:
            replayed = await future
        except asyncio.CancelledError:
            if not future.cancelled():
                raise  # this request itself was cancelled
            # The first attempt failed without changing anything: this one runs anew.
            return await _idempotent(request, api, principal, call, work, session)
        call.detail = "idempotent-replay"
        await _record(api, call, "success" if replayed.status < 400 else str(replayed.status))
        return replayed.status, replayed.body
    try:
        status, produced = await _run(request, api, principal, call, work, body, session)
    except (InvalidRequest, InvalidSession, RateLimited, AuditUnavailable) as exc:
        # Nothing changed: the retry runs again rather than replaying a refusal.
        api.idempotency.forget(principal.client_id, key)
        raise exc from None
    except AgentError as exc:
        future.set_result(Answer(exc.status, jsonio.dumps(exc.body())))
        raise
    except BaseException:
        api.idempotency.forget(principal.client_id, key)
        raise
    future.set_result(Answer(status, produced))
    return status, produced


async def _run(request: web.Request, api: AgentApi, principal: Principal, call: _Call,
               work: Work, body: Any, session: Session | None) -> tuple[int, bytes]:
    status, result = await work(request, api, principal, call, body if session is None
                                else (session, body))
    await _record(api, call, "success")
    return status, jsonio.dumps(result)


async def _body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > _MAX_BODY:
        raise InvalidRequest("the body is too large")
    raw = await request.read()
    if len(raw) > _MAX_BODY:
        raise InvalidRequest("the body is too large")
    if not raw:
        return {}
    try:
        return jsonio.loads(raw)
    except ValueError:
        raise InvalidRequest("the body is not JSON") from None


async def _record(api: AgentApi, call: _Call, outcome: str, detail: str = "") -> None:
    """The audit record of this call, committed before the answer (fail closed: an
    unrecorded success is not answered)."""
    if api.audit is None:
        return
    record = AuditRecord(
        call.action, outcome, client_id=call.client_id, resource_type=call.resource_type,
        control_id=call.call_id, patient=call.patient, purpose=call.purpose,
        profile=f"agent:{call.purpose}" if call.purpose else "agent",
        detail=" ".join(part for part in (f"agent.{call.operation}", call.detail, detail)
                        if part))
    try:
        await api.audit.record(record)
    except Exception as exc:  # the audit store's failure, whatever its kind: not answered
        log.error("agent API %s: audit record failed: %s", call.operation,
                  type(exc).__name__)
        raise AuditUnavailable() from None


async def _record_refusal(api: AgentApi, call: _Call, outcome: str, code: str) -> None:
    """A refusal's record: the refusal is answered even when the trail cannot take it
    (it granted nothing), and the failure is logged."""
    try:
        await _record(api, call, outcome, code)
    except AuditUnavailable:
        pass


# -- the calls --------------------------------------------------------------------------


@routes.get(PREFIX + "/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)


@routes.post(PREFIX + "/sessions")
@_route("verify", Action.SEARCH, "Patient", session=False)
async def create_session(request: web.Request, api: AgentApi, principal: Principal,
                         call: _Call, body: Any) -> tuple[int, Any]:
    asked = requests.verification(body, api.service.rules.phone)
    call.call_id, call.purpose = asked.call_id, asked.purpose
    call.detail = f"second-factor={asked.second[0]}"
    token, session = await api.service.verify(principal.client_id, asked)
    call.patient = session.patient
    return 201, {"session_token": token, "session_id": session.id,
                 "expires_in": int(api.service.sessions.ttl),
                 "patient": {"first_name": session.first_name,
                             "last_name_initial": session.last_name_initial}}


@routes.delete(PREFIX + "/sessions/{id}")
@_route("end", Action.DELETE, "")
async def end_session(request: web.Request, api: AgentApi, principal: Principal,
                      call: _Call, held: Any) -> tuple[int, Any]:
    session, _ = held
    if request.match_info["id"] != session.id:
        raise InvalidSession()
    api.service.end(request.headers[SESSION_HEADER].strip())
    return 200, {"ended": True}


@routes.get(PREFIX + "/appointments")
@_route("appointments", Action.SEARCH, "Appointment")
async def list_appointments(request: web.Request, api: AgentApi, principal: Principal,
                            call: _Call, held: Any) -> tuple[int, Any]:
    session, _ = held
    query = request.query
    status = query.get("status")
    if status is not None and status not in _APPOINTMENT_STATUSES:
        raise InvalidRequest("status is not an appointment status")
    return 200, await api.service.appointments(
        session, requests.moment(query.get("from"), "from"),
        requests.moment(query.get("to"), "to"), status)


@routes.get(PREFIX + "/slots")
@_route("slots", Action.SEARCH, "Slot")
async def list_slots(request: web.Request, api: AgentApi, principal: Principal,
                     call: _Call, held: Any) -> tuple[int, Any]:
    session, _ = held
    query = request.query
    return 200, await api.service.slots(
        session, requests.moment(query.get("from"), "from"),
        requests.moment(query.get("to"), "to"), query.get("provider"), query.get("type"),
        query.get("location"))


@routes.post(PREFIX + "/appointments")
@_route("book", Action.CREATE, "Appointment")
async def book(request: web.Request, api: AgentApi, principal: Principal, call: _Call,
               held: Any) -> tuple[int, Any]:
    session, body = held
    return 201, await api.service.book(session, requests.slot_id(body),
                                       requests.note(body, "reason"))


@routes.post(PREFIX + "/appointments/{id}/cancel")
@_route("cancel", Action.UPDATE, "Appointment")
async def cancel(request: web.Request, api: AgentApi, principal: Principal, call: _Call,
                 held: Any) -> tuple[int, Any]:
    session, body = held
    ident = requests.identifier(request.match_info["id"], "id")
    return 200, await api.service.cancel(session, ident, requests.note(body, "reason"))


@routes.post(PREFIX + "/appointments/{id}/reschedule")
@_route("reschedule", Action.UPDATE, "Appointment")
async def reschedule(request: web.Request, api: AgentApi, principal: Principal,
                     call: _Call, held: Any) -> tuple[int, Any]:
    session, body = held
    ident = requests.identifier(request.match_info["id"], "id")
    return 200, await api.service.reschedule(session, ident, requests.slot_id(body))


@routes.get(PREFIX + "/medications")
@_route("medications", Action.SEARCH, "MedicationRequest")
async def list_medications(request: web.Request, api: AgentApi, principal: Principal,
                           call: _Call, held: Any) -> tuple[int, Any]:
    session, _ = held
    if request.query.get("status", "active") != "active":
        raise InvalidRequest("status: only active medications are served")
    return 200, await api.service.medications(session)


@routes.post(PREFIX + "/refill-requests")
@_route("refill", Action.CREATE, "MedicationRequest")
async def refill(request: web.Request, api: AgentApi, principal: Principal, call: _Call,
                 held: Any) -> tuple[int, Any]:
    session, body = held
    return 201, await api.service.refill(session, requests.medication_id(body),
                                         requests.note(body, "note"))


_APPOINTMENT_STATUSES = frozenset({"proposed", "pending", "booked", "arrived", "fulfilled",
                                   "cancelled", "noshow", "entered-in-error", "checked-in",
                                   "waitlist"})
