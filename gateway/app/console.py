"""The console's spec: what /console may see and do, built from the settings and the
resources the app opens (read when a page asks, so a resource opened later is seen)."""

from __future__ import annotations

from aiohttp import web

from gateway.app.audit import audit_keys
from gateway.app.files import INBOX_FILE
from gateway.app.specs import build_router
from gateway.app.state import APPLIER, CODEC, DATABASE, FORWARDING, POOL, SETTINGS, TRANSLATOR
from gateway.app.tables import load_translator
from gateway.audit.log import verify_reader, verify_store
from gateway.audit.verify import Report
from gateway.config import Settings
from gateway.edge.console import ConsoleSpec, install_console
from gateway.edge.console.sessions import Sessions, User
from gateway.forward.routes import Router
from gateway.ingest.applier import LocalApplier
from gateway.mapping.engine import Translator
from gateway.mapping.errors import TableError, TableErrors
from gateway.mapping.tables import SHIPPED
from gateway.store.inbox_report import InboxReport, SqliteInboxReport
from gateway.store.pg.audit import PgAuditReader
from gateway.store.pg.report import PgInboxReport

AUDIT_FILE = "audit.db"


def setup_console(app: web.Application, settings: Settings) -> None:
    """Serve /console when it is enabled and has users (without users nobody could sign in)."""
    console = settings.console
    if not console.enabled or not console.users:
        return
    users = [User(u.name, u.password_hash, frozenset(u.roles), u.phi) for u in console.users]

    def translator() -> Translator | None:
        return app.get(TRANSLATOR)

    def router() -> Router | None:
        return build_router(settings) if settings.routes else None

    def backends() -> dict[str, float]:
        forwarding = app.get(FORWARDING)
        if forwarding is None:
            return {}
        return {name: backend.available_in() for name, backend in forwarding.backends.items()}

    def apply_soon(fresh: Translator) -> None:
        # In-process applier only: apply workers sweep on their own (every 30 s) with the
        # tables they started with (docs/console.md).
        applier = app.get(APPLIER)
        if isinstance(applier, LocalApplier):
            applier.sweep_soon(fresh)

    on_database = settings.store.backend == "postgresql"

    def store() -> InboxReport:
        if on_database:  # every instance's rows, in the shared database
            return PgInboxReport(app[POOL], app[DATABASE])
        return SqliteInboxReport(settings.store.data_dir / INBOX_FILE, lambda: app[CODEC])

    async def verify_audit() -> Report:
        keys = audit_keys(app[SETTINGS], need_data_keys=False)
        if on_database:
            return await verify_reader(PgAuditReader(app[POOL]),
                                       dict(keys.trusted), keys.signing)
        return await verify_store(settings.store.data_dir / AUDIT_FILE, dict(keys.trusted),
                                  keys.signing)

    def check_tables() -> tuple[list[str], list[str]]:
        try:
            return [], load_translator(settings).message_types
        except TableErrors as exc:
            return [str(error) for error in exc.errors], []
        except TableError as exc:
            return [str(exc)], []

    install_console(app, ConsoleSpec(
        sessions=Sessions.of(users, console.idle_timeout_minutes * 60),
        data_dir=settings.store.data_dir, store=store,
        tables_dir=settings.mapping.tables_dir or SHIPPED, secure_cookies=console.secure_cookies,
        load_translator=lambda: load_translator(settings), translator=translator,
        router=router, backends=backends, apply_soon=apply_soon, verify_audit=verify_audit,
        check_tables=check_tables))
