"""The console's pages: sign-in, dashboard, messages, deliveries, audit, mappings.

Every page but sign-in needs a session; operator pages need the operator role, audit pages
the reviewer role (admin holds both); a message's content needs `phi` as well. Every
view of PHI, every action and every refusal is an audit record made before the answer.
"""

from __future__ import annotations

import csv
import io
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from jinja2 import Environment, PackageLoader, select_autoescape

from gateway.audit.export import CSV_COLUMNS, export
from gateway.audit.patient import reference_from_v2
from gateway.audit.query import AuditQuery, QueryError, build_query
from gateway.audit.record import Action, AuditRecord
from gateway.edge.audit_http import AUDIT
from gateway.edge.console.sessions import Session, csrf_ok
from gateway.edge.console.spec import CONSOLE, ConsoleSpec
from gateway.hl7.errors import Hl7Error
from gateway.hl7.message import parse_message
from gateway.ingest.replay import replay_routed
from gateway.store.errors import StoreUnavailable
from gateway.store.inbox import CONFLICT
from gateway.store.inbox_report import InboxFilter
from gateway.store.refusals_sqlite import REFUSALS_FILE, read_refusals

log = logging.getLogger(__name__)

COOKIE = "isthmus_console"
LOGIN_COOKIE = "isthmus_console_login"
CLIENT = "isthmus-console"
_AUDIT_DB = "audit.db"
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_templates = Environment(loader=PackageLoader("gateway.edge.console", "templates"),
                         autoescape=select_autoescape(default=True), enable_async=False)

routes = web.RouteTableDef()
Handler = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


def page(name: str, request: web.Request, session: Session | None, code: int = 200,
         **values: Any) -> web.Response:
    html = _templates.get_template(name).render(session=session, path=request.path, **values)
    status = code
    return web.Response(text=html, content_type="text/html", status=status, headers=_HEADERS)


def _spec(request: web.Request) -> ConsoleSpec:
    return request.app[CONSOLE]


def _now() -> datetime:
    return datetime.now(UTC)


async def _record(request: web.Request, record: AuditRecord) -> None:
    """Keep the record before the answer; with the trail unusable, the answer is 503."""
    audit = request.app.get(AUDIT)
    if audit is None:
        return
    try:
        await audit.record(record)
    except StoreUnavailable:
        raise web.HTTPServiceUnavailable(text="the access could not be recorded in the "
                                              "audit trail; try again later") from None


def _who(request: web.Request, session: Session | None, action: Action, outcome: str,
         **what: Any) -> AuditRecord:
    return AuditRecord(action, outcome, client_id=CLIENT,
                       user=session.user.name if session else "", peer=request.remote or "",
                       **what)


def guarded(role: str, *, phi: bool = False) -> Callable[[Handler], Callable[
        [web.Request], Awaitable[web.StreamResponse]]]:
    """A page for signed-in users holding `role` (and allowed PHI, with `phi`); a form
    post must carry the session's CSRF token."""
    def wrap(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def checked(request: web.Request) -> web.StreamResponse:
            session = _spec(request).sessions.find(request.cookies.get(COOKIE))
            if session is None:
                raise web.HTTPSeeOther("/console/login")
            if request.method == "POST":
                form = await request.post()
                sent = form.get("csrf")
                if not csrf_ok(session, sent if isinstance(sent, str) else None):
                    await _record(request, _who(request, session, Action.UPDATE, "403",
                                                resource_type="console", query_shape="csrf"))
                    return page("denied.html", request, session, 403,
                                reason="the form is stale or was not sent by this console")
            if not session.user.may(role) or (phi and not session.user.phi):
                await _record(request, _who(request, session, Action.READ, "403",
                                            resource_type="console",
                                            query_shape=request.path))
                reason = ("your account may not see message content" if session.user.may(role)
                          else f"this page needs the {role} role")
                return page("denied.html", request, session, 403, reason=reason)
            return await handler(request, session)
        return checked
    return wrap


# -- sign-in ---------------------------------------------------------------------------------


@routes.get("/console")
async def root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/console/dashboard")


@routes.get("/console/login")
async def login_form(request: web.Request) -> web.StreamResponse:
    token = secrets.token_urlsafe(24)  # double-submit: the form's copy must match the cookie
    response = page("login.html", request, None, login_csrf=token)
    _set_cookie(request, response, LOGIN_COOKIE, token, path="/console/login")
    return response


@routes.post("/console/login")
async def login(request: web.Request) -> web.StreamResponse:
    spec = _spec(request)
    form = await request.post()
    name, password, token = (str(form.get(k, "")) for k in ("name", "password", "csrf"))
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    session = None
    if token and cookie and secrets.compare_digest(token, cookie):
        session = spec.sessions.sign_in(name[:64], password[:1024], request.remote or "")
    # A sign-in is a credential issued or refused; a refused one names no user (it could
    # be a password typed into the name field).
    await _record(request, AuditRecord(
        Action.TOKEN, "success" if session else "401", client_id=CLIENT,
        user=session.user.name if session else "", peer=request.remote or "",
        resource_type="console"))
    if session is None:
        fresh = secrets.token_urlsafe(24)
        response = page("login.html", request, None, 401, login_csrf=fresh,
                        error="sign-in failed")
        _set_cookie(request, response, LOGIN_COOKIE, fresh, path="/console/login")
        return response
    response = web.HTTPSeeOther("/console/dashboard")
    _set_cookie(request, response, COOKIE, session.id, path="/console")
    response.del_cookie(LOGIN_COOKIE, path="/console/login")
    raise response


@routes.post("/console/logout")
@guarded("operator")
async def logout(request: web.Request, session: Session) -> web.StreamResponse:
    _spec(request).sessions.end(session.id)
    response = web.HTTPSeeOther("/console/login")
    response.del_cookie(COOKIE, path="/console")
    raise response


@routes.post("/console/signout")
async def signout(request: web.Request) -> web.StreamResponse:
    """Sign-out for any role (reviewers too): the session's CSRF token is still needed."""
    spec = _spec(request)
    session = spec.sessions.find(request.cookies.get(COOKIE))
    form = await request.post()
    sent = form.get("csrf")
    if session is not None and csrf_ok(session, sent if isinstance(sent, str) else None):
        spec.sessions.end(session.id)
    response = web.HTTPSeeOther("/console/login")
    response.del_cookie(COOKIE, path="/console")
    raise response


def _set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str,
                *, path: str) -> None:
    response.set_cookie(name, value, path=path, httponly=True, samesite="Strict",
                        secure=_spec(request).secure_cookies)


# -- dashboard -------------------------------------------------------------------------------


@routes.get("/console/dashboard")
async def dashboard(request: web.Request) -> web.StreamResponse:
    session = _spec(request).sessions.find(request.cookies.get(COOKIE))
    if session is None:
        raise web.HTTPSeeOther("/console/login")
    if not session.user.may("operator"):  # a reviewer lands on the audit pages
        raise web.HTTPSeeOther("/console/audit")
    return await _dashboard(request, session)


async def _dashboard(request: web.Request, session: Session) -> web.StreamResponse:
    spec = _spec(request)
    since = (_now() - timedelta(hours=1)).isoformat()
    store = spec.store()
    counts = await store.counts(since)
    pending = [(e.status, e.backend) for e in await _outbox_entries(spec, None)]
    depth: dict[str, dict[str, int]] = {}
    for status, backend in pending:
        depth.setdefault(backend, {}).setdefault(status, 0)
        depth[backend][status] += 1
    refusals = await _refusals(spec, 10)
    failed = await store.filtered(InboxFilter(status="failed", limit=10))
    per_minute = sum(n for _, _, n in counts) / 60
    return page("dashboard.html", request, session, counts=counts, per_minute=per_minute,
                backends=spec.backends(), depth=depth, refusals=refusals, failed=failed)


async def _refusals(spec: ConsoleSpec, limit: int) -> list[Any]:
    path = spec.data_dir / REFUSALS_FILE
    return await read_refusals(path, limit) if path.exists() else []


async def _outbox_entries(spec: ConsoleSpec, status: str | None,
                          backend: str | None = None) -> list[Any]:
    return await spec.store().deliveries(status, backend, 500)


# -- messages --------------------------------------------------------------------------------


@routes.get("/console/messages")
@guarded("operator")
async def messages(request: web.Request, session: Session) -> web.StreamResponse:
    query = request.query
    wanted = InboxFilter(status=query.get("status", ""), message_type=query.get("type", ""),
                         sender=query.get("sender", ""), control_id=query.get("control_id", ""),
                         since=query.get("since", ""), until=query.get("until", ""))
    spec = _spec(request)
    if wanted.status == "refused":
        return page("refusals.html", request, session, rows=await _refusals(spec, 200))
    rows = await spec.store().filtered(wanted)
    return page("messages.html", request, session, rows=rows, wanted=wanted)


@routes.get("/console/messages/{id:\\d{1,18}}")
@guarded("operator", phi=True)
async def message(request: web.Request, session: Session) -> web.StreamResponse:
    spec = _spec(request)
    inbox_id = int(request.match_info["id"])
    found = await spec.store().entry(inbox_id)
    if found is None:
        return page("denied.html", request, session, 404, reason="no such message")
    entry, raw, ack = found
    patient, bundle = _patient_and_translation(spec, raw)
    await _record(request, _who(request, session, Action.READ, "success",
                                resource_type="hl7v2-message", resource_id=str(inbox_id),
                                control_id=entry.control_id, patient=patient))
    return page("message.html", request, session, entry=entry, segments=_segments(raw),
                ack=_segments(ack), bundle=bundle)


def _patient_and_translation(spec: ConsoleSpec, raw: bytes) -> tuple[str | None, str]:
    from gateway.fhir.bundle import to_bundle
    from gateway.fhir.jsonio import dumps
    from gateway.mapping.errors import TranslationError

    try:
        parsed = parse_message(raw)
    except Hl7Error as exc:
        return None, f"the message does not parse: {exc.location or ''} {exc.reason}"
    translator = spec.translator()
    if translator is None:
        return reference_from_v2(parsed), "translation is off (mapping.translate_on_ingest)"
    try:
        bundle = dumps(to_bundle(translator.translate(parsed)), pretty=True).decode()
    except TranslationError as exc:
        bundle = f"not translated: {exc}"
    return reference_from_v2(parsed), bundle


def _segments(raw: bytes) -> list[str]:
    text = raw.decode("utf-8", "replace").replace("\r\n", "\r").replace("\n", "\r")
    return [segment for segment in text.split("\r") if segment]


@routes.post("/console/messages/{id:\\d{1,18}}/replay")
@guarded("operator")
async def replay(request: web.Request, session: Session) -> web.StreamResponse:
    spec = _spec(request)
    inbox_id = int(request.match_info["id"])
    store = spec.store()
    rows = await store.raw([inbox_id])
    found = await store.entry(inbox_id)
    if not rows or found is None:
        return page("denied.html", request, session, 404, reason="no such message")
    try:
        translator = spec.load_translator()
    except Exception as exc:  # noqa: BLE001 - the tables on disk are broken: say so
        return page("denied.html", request, session, 409,
                    reason=f"the mapping tables are not usable ({type(exc).__name__}); "
                           "see the Mappings page")
    row_id, raw, received = rows[0]
    outcome = replay_routed(translator, spec.router(), row_id, raw, received,
                            routed=found[0].status != CONFLICT)
    patient, _ = _patient_and_translation(spec, raw)
    await _record(request, _who(request, session, Action.TRANSLATE,
                                "success" if outcome.status in ("translated", "routed")
                                else outcome.status, resource_type="hl7v2-message",
                                resource_id=str(inbox_id), patient=patient))
    await store.record_outcomes([outcome])
    spec.apply_soon(translator)
    raise web.HTTPSeeOther(f"/console/messages/{inbox_id}/status")


@routes.get("/console/messages/{id:\\d{1,18}}/status")
@guarded("operator")
async def message_status(request: web.Request, session: Session) -> web.StreamResponse:
    """A message's row without its content: what operators without PHI rights see."""
    spec = _spec(request)
    found = await spec.store().entry(int(request.match_info["id"]))
    if found is None:
        return page("denied.html", request, session, 404, reason="no such message")
    return page("status.html", request, session, entry=found[0])


# -- deliveries ------------------------------------------------------------------------------


@routes.get("/console/deliveries")
@guarded("operator")
async def deliveries(request: web.Request, session: Session) -> web.StreamResponse:
    status = request.query.get("status") or None
    backend = request.query.get("backend") or None
    rows = await _outbox_entries(_spec(request), status, backend)
    return page("deliveries.html", request, session, rows=rows, status=status or "",
                backend=backend or "")


@routes.post("/console/deliveries/{action:retry|drop}")
@guarded("operator")
async def delivery_action(request: web.Request, session: Session) -> web.StreamResponse:
    form = await request.post()
    action = request.match_info["action"]
    ids = [int(v) for v in form.getall("id", []) if isinstance(v, str) and v.isdigit()]
    if not ids:
        return page("denied.html", request, session, 400, reason="no delivery was chosen")
    if action == "drop" and form.get("confirm") != "yes":
        return page("confirm_drop.html", request, session, ids=ids)
    store = _spec(request).store()
    changed = await (store.retry(ids) if action == "retry" else store.drop(ids))
    await _record(request, _who(request, session, Action.UPDATE, "success",
                                resource_type="outbox", resource_id=",".join(map(str, ids)),
                                query_shape=action))
    done = "set to pending" if action == "retry" else "dropped"
    return page("done.html", request, session, message=f"{changed} deliveries {done}")


# -- audit (reviewers) -----------------------------------------------------------------------


@routes.get("/console/audit")
@guarded("reviewer")
async def audit_search(request: web.Request, session: Session) -> web.StreamResponse:
    values = {k: request.query.get(k, "") for k in ("from", "to", "client", "action")}
    rows: list[dict[str, str]] = []
    error = ""
    if request.query.get("search"):
        try:
            query = _audit_query(values)
        except QueryError as exc:
            error = str(exc)
        else:
            rows = await _audit_rows(request, session, query)
    return page("audit.html", request, session, values=values, rows=rows, error=error)


def _audit_query(values: dict[str, str]) -> AuditQuery:
    return build_query(values.get("from") or None, values.get("to") or None, None,
                       values.get("client") or None, values.get("action") or None)


async def _audit_rows(request: web.Request, session: Session,
                      query: AuditQuery) -> list[dict[str, str]]:
    audit = request.app[AUDIT]
    await _record(request, _who(request, session, Action.SEARCH, "success",
                                resource_type="AuditEvent", query_shape=query.text()))
    body = io.BytesIO()
    covered = await audit.cover()
    await export(audit, query, "csv", body.write, covered_through=covered, decrypt=False,
                 exporter=f"console:{session.user.name}", limit=200)
    reader = csv.DictReader(io.StringIO(body.getvalue().decode()))
    return [{c: row.get(c, "") for c in CSV_COLUMNS} for row in reader
            if row.get("kind") == "record"]


@routes.get("/console/audit/export")
@guarded("reviewer")
async def audit_export(request: web.Request, session: Session) -> web.StreamResponse:
    values = {k: request.query.get(k, "") for k in ("from", "to", "client", "action")}
    fmt = request.query.get("format", "ndjson")
    if fmt not in ("ndjson", "bundle", "csv"):
        return page("denied.html", request, session, 400, reason="format: ndjson, bundle or csv")
    try:
        query = _audit_query(values)
    except QueryError as exc:
        return page("denied.html", request, session, 400, reason=str(exc))
    audit = request.app[AUDIT]
    await _record(request, _who(request, session, Action.EXPORT, "success",
                                resource_type="AuditEvent", query=query.text(),
                                query_shape=query.text(with_patient=False), detail=fmt))
    body = io.BytesIO()
    covered = await audit.seal_head()
    await export(audit, query, fmt, body.write, covered_through=covered, decrypt=False,
                 exporter=f"console:{session.user.name}")
    extension = {"ndjson": "ndjson", "bundle": "json", "csv": "csv"}[fmt]
    return web.Response(body=body.getvalue(), headers={
        **_HEADERS, "Content-Disposition": f'attachment; filename="audit.{extension}"',
        "Content-Type": "text/csv" if fmt == "csv" else "application/fhir+json"})


@routes.get("/console/audit/verify")
@guarded("reviewer")
async def audit_verify(request: web.Request, session: Session) -> web.StreamResponse:
    report = await _spec(request).verify_audit()
    problems = [f"record {p.position}: {p.reason}" for p in report.problems[:20]]
    return page("verify.html", request, session, report=report, problems=problems)


# -- mappings --------------------------------------------------------------------------------


@routes.get("/console/mappings")
@guarded("operator")
async def mappings(request: web.Request, session: Session) -> web.StreamResponse:
    spec = _spec(request)
    problems, types = spec.check_tables()
    tables = spec.tables_dir
    files = sorted(str(p.relative_to(tables)) for p in tables.rglob("*.csv")) \
        if tables.is_dir() else []
    return page("mappings.html", request, session, types=types, problems=problems,
                files=files)
