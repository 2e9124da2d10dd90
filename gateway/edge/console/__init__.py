"""The operator console at /console: server-rendered HTML for operators and reviewers.

Readable without JavaScript (there is none): Jinja2 templates, forms for every action,
a CSRF token on each, session cookies `HttpOnly; Secure; SameSite=Strict`, no PHI in any
URL (a message is addressed by its inbox id). What the console shows comes through a
`ConsoleSpec` the composition builds, so this package reads no config and opens nothing.
"""

from __future__ import annotations

from aiohttp import web

from gateway.edge.console.spec import CONSOLE, ConsoleSpec
from gateway.edge.console.views import routes


def install_console(app: web.Application, spec: ConsoleSpec) -> None:
    app[CONSOLE] = spec
    app.add_routes(routes)


__all__ = ["CONSOLE", "ConsoleSpec", "install_console"]
