"""What the console may see and do, handed over by the composition."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.audit.verify import Report
from gateway.edge.console.sessions import Sessions
from gateway.forward.routes import Router
from gateway.mapping.engine import Translator
from gateway.store.inbox_report import InboxReport


@dataclass(frozen=True)
class ConsoleSpec:
    sessions: Sessions
    data_dir: Path
    tables_dir: Path  # the tables in use (mapping.tables_dir, or the shipped ones)
    secure_cookies: bool
    # The inbox and outbox, on whichever backend (read when a page asks: the store is
    # opened after the app is built).
    store: Callable[[], InboxReport]
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
