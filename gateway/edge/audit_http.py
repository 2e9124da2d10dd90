"""`GET /audit/AuditEvent`: the audit trail for compliance reviewers, paged, over HTTP.

Reviewers authenticate with their own bearer token (configured as its SHA-256 under
`audit.reviewers`, compared in constant time) carrying the role `audit.read`; PHI comes
back decrypted only to a reviewer allowed to decrypt who asks for it (`decrypt=true`).
Each page is a FHIR searchset Bundle whose entries are BALP-shaped AuditEvents, with the
chain data that lets a saved page be verified offline. Every request is itself recorded
before any data goes out: refused ones as denials, and if the record cannot be written the
answer is 503 and nothing else (fail closed). Refusals are raised; the edge's one error
middleware (`fhir_errors.outcomes`) answers them as OperationOutcomes.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import re
from dataclasses import dataclass
from urllib.parse import urlencode

from aiohttp import web

from gateway.audit.export import ExportResult, export
from gateway.audit.log import AuditLog
from gateway.audit.query import AuditQuery, QueryError, build_query
from gateway.audit.record import Action, AuditRecord
from gateway.fhir.outcome import FHIR_JSON, FhirError
from gateway.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

READ_ROLE = "audit.read"
PURPOSE = "HCOMPL"  # v3 ActReason: health compliance
DEFAULT_COUNT = 100
MAX_COUNT = 1000
_FILTERS = ("from", "to", "patient", "client", "action")
_PARAMETERS = frozenset({*_FILTERS, "_count", "_page_after", "decrypt"})
_PARAMETER_NAME = re.compile(r"_?[a-z][a-z-]{0,30}")


@dataclass(frozen=True, slots=True)
class Reviewer:
    """A reviewer credential: who, the SHA-256 of their token, roles, may decrypt."""

    name: str
    token_sha256: bytes
    roles: frozenset[str]
    decrypt: bool = False


AUDIT = web.AppKey("audit", AuditLog)
REVIEWERS = web.AppKey("audit_reviewers", tuple)

routes = web.RouteTableDef()


@routes.get("/audit/AuditEvent")
async def search_audit_events(request: web.Request) -> web.Response:
    """One page of the trail; every refusal is raised, recorded first, and answered as an
    OperationOutcome by `fhir_errors.outcomes`."""
    audit = request.app.get(AUDIT)
    if audit is None:
        raise FhirError(503, "the audit trail is not enabled", code="not-supported")
    reviewer = authenticate(request.headers.get("Authorization", ""),
                            request.app.get(REVIEWERS, ()))
    if reviewer is None:
        await _record_refusal(audit, request, None, "401")
        raise FhirError(401, "a reviewer bearer token is required", code="login",
                        headers={"WWW-Authenticate": 'Bearer realm="isthmus-audit"'})
    if READ_ROLE not in reviewer.roles:
        await _record_refusal(audit, request, reviewer, "403")
        raise FhirError(403, f"this credential lacks the role {READ_ROLE}", code="forbidden")
    try:
        query, count, after, decrypt = parse_parameters(request)
    except QueryError:
        await _record_refusal(audit, request, reviewer, "400")
        raise
    if decrypt and not reviewer.decrypt:
        await _record_refusal(audit, request, reviewer, "403")
        raise FhirError(403, "this credential may not see PHI decrypted", code="forbidden")
    try:
        await audit.record(_access(request, reviewer, query, "success"))
    except StoreUnavailable:
        raise FhirError(503, "the access could not be recorded in the audit trail; try "
                        "again later", code="transient") from None
    body = io.BytesIO()
    try:
        covered = await audit.cover()
        await export(
            audit, query, "bundle", body.write, covered_through=covered, decrypt=decrypt,
            exporter=f"http:{reviewer.name}", after=after, limit=count,
            bundle_type="searchset", links=lambda result: _links(request, result),
            base_url=f"{request.scheme}://{request.host}/audit")
    except Exception as exc:  # the answer names no detail: it could carry record content
        log.error("audit search failed: %s", type(exc).__name__)
        await _record_refusal(audit, request, reviewer, "500")
        raise FhirError(500, "the audit trail could not be read", code="exception") from None
    return web.Response(body=body.getvalue(), content_type=FHIR_JSON)


def authenticate(authorization: str, reviewers: tuple[Reviewer, ...]) -> Reviewer | None:
    """The reviewer whose token this is; every candidate compared in constant time."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    presented = hashlib.sha256(token.strip().encode()).digest()
    found = None
    for reviewer in reviewers:
        if hmac.compare_digest(presented, reviewer.token_sha256):
            found = reviewer
    return found


def parse_parameters(request: web.Request) -> tuple[AuditQuery, int, int, bool]:
    params = request.query
    for name in params:
        if name not in _PARAMETERS:
            # The name is echoed only when it looks like one (input is not repeated back).
            shown = name if _PARAMETER_NAME.fullmatch(name) else "a parameter"
            raise QueryError(shown, "unknown search parameter (known: "
                                    + ", ".join(sorted(_PARAMETERS)) + ")")
        if len(params.getall(name)) > 1:
            raise QueryError(name, "given more than once")
    query = build_query(*(params.get(name) for name in _FILTERS))
    count = _integer(params.get("_count"), "_count", DEFAULT_COUNT, 1, MAX_COUNT)
    after = _integer(params.get("_page_after"), "_page_after", 0, 0, 1 << 62)
    decrypt = params.get("decrypt", "false").lower()
    if decrypt not in ("true", "false"):
        raise QueryError("decrypt", "must be true or false")
    return query, count, after, decrypt == "true"


def _integer(text: str | None, name: str, default: int, low: int, high: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise QueryError(name, "must be a whole number") from None
    if not low <= value <= high:
        raise QueryError(name, f"must be between {low} and {high}")
    return value


def _links(request: web.Request, result: ExportResult) -> list[dict[str, str]]:
    base = f"{request.scheme}://{request.host}{request.path}"
    links = [{"relation": "self", "url": str(request.url)}]
    if result.more:
        params = [(k, v) for k, v in request.query.items() if k != "_page_after"]
        params.append(("_page_after", str(result.last_seq)))
        links.append({"relation": "next", "url": f"{base}?{urlencode(params)}"})
    return links


def _access(request: web.Request, reviewer: Reviewer | None, query: AuditQuery | None,
            result: str) -> AuditRecord:
    name = reviewer.name if reviewer is not None else ""
    return AuditRecord(
        Action.SEARCH, result,
        client_id=f"reviewer:{name}" if name else "",
        user=name,
        peer=request.remote or "",
        resource_type="AuditEvent",
        patient=query.patient if query is not None else None,
        query=request.query_string or None,
        query_shape=query.text(with_patient=False) if query is not None else "",
        purpose=PURPOSE,
    )


async def _record_refusal(audit: AuditLog, request: web.Request, reviewer: Reviewer | None,
                          status: str) -> None:
    """A refused request is recorded too; the refusal stands even if recording fails."""
    try:
        await audit.record(_access(request, reviewer, None, status))
    except StoreUnavailable:
        log.error("a refused audit request could not be recorded")
