"""`isthmus outbox list|show|retry|drop`: deliveries to remote backends, beside a
(possibly running) gateway."""

from __future__ import annotations

import argparse
import asyncio
import enum
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from gateway.cli.shared import inbox_path, settings_from

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers
    from gateway.config import Settings
    from gateway.store.outbox import OutboxEntry, SqliteOutbox
    from gateway.store.pg.outbox import PgOutbox

T = TypeVar("T")

# gateway.store.outbox.STATUSES, spelled out so that building the parser imports no store.
_OUTBOX_STATUSES = ("pending", "delivered", "dead", "dropped")


class _Outbox(enum.Enum):
    UNUSABLE = enum.auto()


# What _outbox_run gives when the outbox could not be used (stderr already says why).
_UNUSABLE: Final = _Outbox.UNUSABLE


def add_parser(sub: Subparsers) -> None:
    outbox = sub.add_parser("outbox", help="deliveries to remote backends: see, retry, drop")
    outbox.add_argument("--data-dir", type=Path, help="where the store lives (store.data_dir)")
    actions = outbox.add_subparsers(metavar="ACTION")
    listing = actions.add_parser("list", help="recent deliveries, newest first (no PHI shown)")
    listing.add_argument("--status", choices=_OUTBOX_STATUSES)
    listing.add_argument("--backend", metavar="NAME")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(run=_outbox_list)
    show = actions.add_parser("show", help="one delivery: statuses and times (not the message)")
    show.add_argument("id", type=int)
    show.set_defaults(run=_outbox_show)
    retry = actions.add_parser(
        "retry", help="deliver dead (or dropped) rows again, with a fresh attempt budget")
    retry.add_argument("ids", type=int, nargs="*", metavar="ID")
    retry.add_argument("--all-dead", action="store_true", help="every dead row")
    retry.add_argument("--backend", metavar="NAME", help="only rows for this backend")
    retry.set_defaults(run=_outbox_retry, usage=retry.format_usage())
    drop = actions.add_parser("drop", help="set rows aside for good (kept, never delivered)")
    drop.add_argument("ids", type=int, nargs="+", metavar="ID")
    drop.set_defaults(run=_outbox_drop)


def _outbox_run(args: argparse.Namespace,
                action: Callable[[SqliteOutbox | PgOutbox], Awaitable[T]]
                ) -> T | Literal[_Outbox.UNUSABLE]:
    """`action(outbox)` on the outbox beside a (possibly running) gateway, or
    _UNUSABLE after saying why the outbox cannot be used."""
    from gateway.store.errors import StoreUnavailable
    from gateway.store.outbox import open_outbox

    settings = settings_from(args, **{"store.data_dir": args.data_dir})
    if settings.store.backend == "postgresql":
        run = _on_database(settings, action)
    else:
        path = inbox_path(args)

        async def run() -> T:
            async with open_outbox(path) as outbox:
                return await action(outbox)

    try:
        return asyncio.run(run())
    except (StoreUnavailable, sqlite3.Error) as exc:
        reason = exc if isinstance(exc, StoreUnavailable) else type(exc).__name__
        print(f"isthmus outbox: the outbox cannot be used ({reason})", file=sys.stderr)
        return _UNUSABLE


def _outbox_list(args: argparse.Namespace) -> int:
    entries = _outbox_run(args, lambda o: o.list_entries(args.status, args.backend,
                                                        args.limit))
    if entries is _UNUSABLE:
        return 1
    print(f"{'ID':>8}  {'INBOX':>8}  {'BACKEND':<12}  {'STATUS':<9}  {'TRIES':>5}  "
          f"{'TYPE':<9}  {'CONTROL ID':<22}  {'LAST STATUS':<18}  {'ERROR':<40}  UPDATED")
    for e in entries:
        print(f"{e.id:>8}  {e.inbox_id:>8}  {e.backend[:12]:<12}  {e.status:<9}  "
              f"{e.attempts:>5}  {e.message_type[:9]:<9}  {e.control_id[:22]:<22}  "
              f"{e.last_status[:18] or '-':<18}  {e.error[:40] or '-':<40}  {e.updated_at}")
    return 0


def _outbox_show(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from gateway.forward.outbox import control_id_for

    found = _outbox_run(args, lambda o: _entry_and_holds(o, args.id))
    if found is _UNUSABLE:
        return 1
    entry, blocker, held = found
    if entry is None:
        print(f"isthmus outbox show: no delivery with id {args.id}", file=sys.stderr)
        return 1
    if entry.status != "pending":
        next_attempt = "-"
    elif blocker is not None:
        # Per-patient order: it goes once the dead row before it is retried or dropped.
        next_attempt = f"after delivery {blocker} (dead; isthmus outbox retry|drop {blocker})"
    elif entry.next_at <= datetime.now(UTC).timestamp():
        next_attempt = "now"
    else:
        next_attempt = datetime.fromtimestamp(entry.next_at, UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
    for name, value in (
            ("id", entry.id), ("inbox id", entry.inbox_id), ("backend", entry.backend),
            ("status", entry.status), ("attempts", entry.attempts),
            ("message type", entry.message_type), ("control id", entry.control_id),
            ("sent as", control_id_for(entry.id)), ("last status", entry.last_status or "-"),
            ("error", entry.error or "-"), ("created", entry.created_at),
            ("updated", entry.updated_at), ("next attempt", next_attempt)):
        print(f"{name}: {value}")
    if entry.status == "dead":
        print(f"holds: {held} later deliveries of its patient")
    return 0


def _on_database(settings: Settings, action: Callable[[SqliteOutbox | PgOutbox], Awaitable[T]]
                 ) -> Callable[[], Coroutine[Any, Any, T]]:
    """`action` on the PostgreSQL outbox the settings name (store.backend)."""
    from dataclasses import replace

    from gateway.app.specs import pg_spec
    from gateway.store.pg.connect import open_pool
    from gateway.store.pg.outbox import PgOutbox

    async def run() -> T:
        spec = replace(pg_spec(settings), pool_min_size=1, pool_max_size=2)
        pool = await open_pool(spec)
        try:
            return await action(PgOutbox(pool, spec, "isthmus-cli"))
        finally:
            await pool.close()

    return run


async def _entry_and_holds(outbox: SqliteOutbox | PgOutbox, row_id: int
                           ) -> tuple[OutboxEntry | None, int | None, int]:
    """A row, the dead row it waits behind (if any) and how many rows it holds (if dead)."""
    entry = await outbox.get(row_id)
    if entry is None:
        return None, None, 0
    return entry, await outbox.waits_for(row_id), await outbox.held_by(row_id)


def _outbox_retry(args: argparse.Namespace) -> int:
    if bool(args.ids) == args.all_dead:
        print(args.usage.rstrip(), file=sys.stderr)
        print("isthmus outbox retry: give IDs or --all-dead (one of them)", file=sys.stderr)
        return 2
    ids = None if args.all_dead else args.ids
    changed = _outbox_run(args, lambda o: o.retry(ids, args.backend))
    if changed is _UNUSABLE:
        return 1
    print(f"{changed} deliveries set to pending")
    return 0 if changed else 1


def _outbox_drop(args: argparse.Namespace) -> int:
    changed = _outbox_run(args, lambda o: o.drop(args.ids))
    if changed is _UNUSABLE:
        return 1
    print(f"{changed} deliveries dropped")
    return 0 if changed else 1
