"""The one place a refusal becomes an answer: every failure under /fhir, and every
refusal the layers raise elsewhere (the reviewers' /audit endpoint), answers an
OperationOutcome with its status and headers (WWW-Authenticate, Retry-After) and no
patient data in its text. A FHIR request refused for its credentials (401) or its
authorization (403) is recorded in the audit trail first: that is how probing for other
patients' data shows up. Spans and metrics are another middleware's (`edge.http`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from opentelemetry import trace

from gateway.audit.query import QueryError
from gateway.audit.record import Action, AuditRecord
from gateway.edge.audit_http import AUDIT
from gateway.edge.auth import PRINCIPAL, AuthError
from gateway.edge.errors import BackendFailed as BackendFailed  # defined with the edge's root
from gateway.edge.errors import BackendRefused
from gateway.edge.errors import Passthrough as Passthrough  # defined with the edge's root
from gateway.fhir.outcome import FHIR_JSON, FhirError, outcome_bytes
from gateway.forward.backend import BackendTimeout
from gateway.store.errors import SearchUnsupported, StoreUnavailable

# The logger the refusals have always been logged under (operators filter on it).
log = logging.getLogger("gateway.edge.fhir_http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# What the layers below raise for a request they refuse: answered on every path.
_REFUSALS = (FhirError, AuthError, QueryError, Passthrough, BackendFailed, SearchUnsupported)
# Refusals recorded in the audit trail, and how long the answer waits for the record: it
# is answered anyway after that (refusing grants nothing), the record commits when it can.
_AUDITED = frozenset({401, 403})
# A remote backend's refusals are recorded too, whatever their status: the caller was
# refused by the EHR, which the trail must show as it shows the gateway's own refusals.
_FROM_BACKEND = (Passthrough, BackendFailed, BackendRefused)
REFUSAL_AUDIT_WAIT = 2.0


@web.middleware
async def outcomes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure under /fhir answers an OperationOutcome; elsewhere only a refusal
    the layers raised does, and anything else (aiohttp's own 404, a bug) passes untouched."""
    if request.path.startswith("/fhir"):
        try:
            return await handler(request)
        except Exception as exc:
            answer = refusal(request, exc)
            if answer.status in _AUDITED or isinstance(exc, _FROM_BACKEND):
                await _record_refusal(request, answer.status, exc)
            return answer
    try:
        return await handler(request)
    except _REFUSALS as exc:
        return refusal(request, exc)


def refusal(request: web.Request, error: Exception) -> web.StreamResponse:
    """The OperationOutcome for whatever a handler raised (the one place errors turn into
    answers)."""
    try:
        raise error
    except FhirError as exc:
        return _outcome(exc.status, exc.reason, exc.expression, exc.code, exc.headers,
                        exc.details)
    except AuthError as exc:
        headers = {"WWW-Authenticate": exc.www_authenticate} if exc.www_authenticate else {}
        return _outcome(exc.status, exc.reason, headers=headers)
    except QueryError as exc:
        return _outcome(400, str(exc), exc.name, "invalid")
    except Passthrough as exc:
        return exc.response
    except BackendFailed as exc:
        if isinstance(exc.error, BackendTimeout):
            return _outcome(504, f"backend {exc.backend} did not answer in time; try again "
                            "later", code="timeout")
        wait = max(1, math.ceil(exc.error.retry_after))
        return _outcome(503, f"backend {exc.backend} is unavailable ({exc.error.reason}); "
                        f"try again in {wait} s", code="transient",
                        headers={"Retry-After": str(wait)})
    except SearchUnsupported as exc:
        return _outcome(400, str(exc), exc.parameter, "not-supported")
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


async def _record_refusal(request: web.Request, status: int, error: Exception) -> None:
    """Who was refused what (action, type, the client when it was authenticated), never
    which resource or patient: the ids and the query are the probe's PHI."""
    audit = request.app.get(AUDIT)
    if audit is None:
        return
    principal = request.get(PRINCIPAL)
    profile = (principal.profile or "") if principal is not None else ""
    span = trace.get_current_span().get_span_context()
    record = AuditRecord(
        _action(request), str(status),
        client_id=principal.client_id if principal is not None else "",
        peer=request.remote or "", resource_type=request.match_info.get("type", ""),
        purpose=profile, profile=profile,  # as every FHIR access record says it
        control_id=request.headers.get("X-Request-Id", "")[:64],
        trace_id=format(span.trace_id, "032x") if span.is_valid else "",
        # AuthError reasons are fixed phrases (jose's TokenError); other refusals' texts
        # may name search parameters, so only their kind is kept.
        detail=(error.reason[:120] if isinstance(error, AuthError)
                else "refused by the backend" if isinstance(error, _FROM_BACKEND)
                else "refused"))
    try:
        await asyncio.wait_for(audit.record(record), REFUSAL_AUDIT_WAIT)
    except (TimeoutError, StoreUnavailable):
        log.warning("a refused FHIR request (%d) could not be recorded in time", status)


def _action(request: web.Request) -> Action:
    """The interaction a refused request attempted, from its method and URL alone."""
    method = request.method
    if method in ("GET", "HEAD"):
        return Action.READ if "id" in request.match_info else Action.SEARCH
    if method == "POST":
        return Action.SEARCH if request.path.endswith("/_search") else Action.CREATE
    if method == "DELETE":
        return Action.DELETE
    return Action.UPDATE  # PUT, PATCH


def parser_refusal(error: HttpProcessingError, max_line_bytes: int) -> web.Response:
    """The OperationOutcome for a request aiohttp's HTTP parser refused before any route
    saw it (so its path is unknown): a 400 naming the rule, never the bytes it quotes."""
    if isinstance(error, LineTooLong):
        return _outcome(400, f"the request line or a header field is longer than "
                             f"{max_line_bytes} bytes", code="too-long")
    return _outcome(400, "not a valid HTTP/1.1 request (request line or headers)")


def _outcome(status: int, reason: str, expression: str | None = None,
             code: str | None = None, headers: Mapping[str, str] | None = None,
             details: list[dict[str, str]] | None = None) -> web.Response:
    body = outcome_bytes(FhirError(status, reason, expression, code, details=details))
    return web.Response(body=body, status=status, headers=dict(headers or {}),
                        content_type=FHIR_JSON)
