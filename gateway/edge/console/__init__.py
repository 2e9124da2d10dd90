"""The operator console at /console: server-rendered HTML for operators and reviewers.

Readable without JavaScript (there is none): Jinja2 templates, forms for every action,
a CSRF token on each, session cookies `HttpOnly; Secure; SameSite=Strict`, no PHI in any
URL (a message is addressed by its inbox id). What the console shows comes through a
`ConsoleSpec` the composition builds, so this package reads no config and opens nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.audit.verify import Report
from gateway.edge.console.sessions import Sessions
from gateway.forward.routes import Router
from gateway.mapping.engine import Translator


@dataclass(frozen=True)
class ConsoleSpec:
    sessions: Sessions
    data_dir: Path
    tables_dir: Path  # the tables in use (mapping.tables_dir, or the shipped ones)
    secure_cookies: bool
    # The tables as they are on disk now (a replay after a table was fixed), and the
    # tables the gateway runs with (a message's translation as it would be made now).
    load_translator: Callable[[], Translator]
    translator: Callable[[], Translator | None]
    router: Callable[[], Router | None]
    # Backend name -> seconds until its breaker lets a call through (0: closed).
    backends: Callable[[], dict[str, float]]
    # Rows a replay marked `translated` are applied now, with the tables it used.
    apply_soon: Callable[[Translator], None]
    verify_audit: Callable[[], Awaitable[Report]]
    # `isthmus mappings check`: the problems of the tables on disk (empty: usable) and
    # the message types they translate.
    check_tables: Callable[[], tuple[list[str], list[str]]]


CONSOLE = web.AppKey("console", ConsoleSpec)


def install_console(app: web.Application, spec: ConsoleSpec) -> None:
    from gateway.edge.console.views import routes

    app[CONSOLE] = spec
    app.add_routes(routes)


__all__ = ["CONSOLE", "ConsoleSpec", "install_console"]
