"""`isthmus webhooks list`: the change notifications backends sent, beside a (possibly
running) gateway: status, attempts and reason, never the resource's id."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.shared import database_pool, settings_from

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers
    from gateway.config import Settings
    from gateway.store.webhooks import EventRow

# gateway.store.webhooks.STATUSES, spelled out so that building the parser imports no store.
_STATUSES = ("pending", "done", "gone", "failed")


def add_parser(sub: Subparsers) -> None:
    webhooks = sub.add_parser("webhooks", help="change notifications backends sent (no PHI)")
    webhooks.add_argument("--data-dir", type=Path,
                          help="where the store lives (store.data_dir)")
    actions = webhooks.add_subparsers(metavar="ACTION")
    listing = actions.add_parser("list", help="events in receipt order (no resource ids)")
    listing.add_argument("--status", choices=_STATUSES)
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(run=_list)


def _list(args: argparse.Namespace) -> int:
    from gateway.store.errors import StoreUnavailable

    settings = settings_from(args, **{"store.data_dir": args.data_dir})
    try:
        rows = (asyncio.run(_on_database(settings, args.status, args.limit))
                if settings.store.backend == "postgresql"
                else _in_file(settings, args.status, args.limit))
    except (StoreUnavailable, sqlite3.Error) as exc:
        reason = exc if isinstance(exc, StoreUnavailable) else type(exc).__name__
        print(f"isthmus webhooks: the events cannot be read ({reason})", file=sys.stderr)
        return 1
    print(f"{'ID':>8}  {'BACKEND':<12}  {'EVENT ID':<24}  {'KIND':<22}  {'TYPE':<16}  "
          f"{'STATUS':<8}  {'TRIES':>5}  REASON")
    for row in rows:
        print(f"{row.id:>8}  {row.backend[:12]:<12}  {row.event_id[:24]:<24}  "
              f"{row.kind[:22]:<22}  {row.resource_type[:16]:<16}  {row.status:<8}  "
              f"{row.attempts:>5}  {row.reason or '-'}")
    return 0


def _in_file(settings: Settings, status: str | None, limit: int) -> list[EventRow]:
    """Read-only, so that a running gateway's claims are left as they are."""
    from gateway.store.webhooks import WEBHOOKS_FILE, EventRow

    path = settings.store.data_dir / WEBHOOKS_FILE
    if not path.exists():
        return []
    where, values = ("WHERE status = ?", (status, limit)) if status else ("", (limit,))
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        found = db.execute(
            "SELECT id, backend, event_id, kind, resource_type, status, attempts, reason "
            f"FROM webhook_event {where} ORDER BY id LIMIT ?", values).fetchall()
    return [EventRow(*row) for row in found]


async def _on_database(settings: Settings, status: str | None, limit: int) -> list[EventRow]:
    from gateway.store.pg.webhooks import PgWebhookEvents

    async with database_pool(settings) as pool:
        return await PgWebhookEvents(pool).rows(status, limit)
