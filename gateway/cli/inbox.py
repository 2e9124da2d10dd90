"""`isthmus inbox list|show|replay`: what was received, one message with its ACK, and
stored messages translated again after a table is fixed."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from gateway.cli.access import message_access, record_accesses
from gateway.cli.shared import database_pool, inbox_path, settings_from, tables_or_exit
from gateway.config import ConfigError

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers
    from gateway.config import Settings
    from gateway.store.pg.inbox import PgInbox
    from gateway.store.sealing import RowCodec

T = TypeVar("T")


def add_parser(sub: Subparsers) -> None:
    inbox = sub.add_parser("inbox", help="what was received")
    inbox.add_argument("--data-dir", type=Path, help="where the store lives (store.data_dir)")
    inbox_sub = inbox.add_subparsers(metavar="ACTION")
    listing = inbox_sub.add_parser("list", help="recent messages (no PHI shown)")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument(
        "--status", help="received, translated, applied, failed, conflict, ...; 'refused': "
                         "messages refused before storage (AR/AE), without their content")
    listing.set_defaults(run=_inbox_list)
    show = inbox_sub.add_parser("show", help="one message, with its ACK")
    show.add_argument("id", type=int)
    show.set_defaults(run=_inbox_show)
    replay = inbox_sub.add_parser(
        "replay", help="translate stored messages again (after a table is fixed)")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?",
                       help="one inbox id (a conflict row too, once reviewed)")
    which.add_argument("--failed", action="store_true",
                       help="every message that failed or had no table (not conflicts)")
    replay.set_defaults(run=_inbox_replay)


def _database(args: argparse.Namespace) -> Settings | None:
    """The settings when the inbox is in PostgreSQL (store.backend), else None."""
    settings = settings_from(args, **{"store.data_dir": args.data_dir})
    return settings if settings.store.backend == "postgresql" else None


async def _on_database(settings: Settings, action: Callable[[PgInbox], Awaitable[T]]) -> T:
    from gateway.store.pg.inbox import PgInbox

    async with database_pool(settings) as pool:
        return await action(PgInbox(pool))  # reads and replays only: no writer started


def _inbox_list(args: argparse.Namespace) -> int:
    from gateway.store.inbox_sqlite import read_entries

    if args.status == "refused":
        return _refused_list(args)
    settings = _database(args)
    entries = asyncio.run(
        _on_database(settings, lambda inbox: inbox.list(args.limit, args.status))
        if settings is not None else read_entries(inbox_path(args), args.limit, args.status))
    print(f"{'ID':>8}  {'RECEIVED AT':<27}  {'CONTROL ID':<22}  {'TYPE':<9}  "
          f"{'SENDER':<30}  STATUS")
    for e in entries:
        sender = f"{e.sending_application}/{e.sending_facility}"
        print(f"{e.id:>8}  {e.received_at:<27}  {e.control_id[:22]:<22}  "
              f"{e.message_type:<9}  {sender[:30]:<30}  {e.status}")
    return 0


def _refused_list(args: argparse.Namespace) -> int:
    """Refused messages are not stored; their PHI-free records are (refusals.db)."""
    from gateway.store.refusals_sqlite import REFUSALS_FILE, read_refusals

    path = inbox_path(args).parent / REFUSALS_FILE
    if not path.exists():
        raise ConfigError(f"no refusal records at {path} (set --data-dir or store.data_dir)")
    rows = asyncio.run(read_refusals(path, args.limit))
    print(f"{'ID':>8}  {'REFUSED AT':<29}  {'CONTROL ID':<22}  {'TYPE':<9}  "
          f"{'SENDER':<30}  ACK  ERRORS")
    for row in rows:
        r = row.refusal
        sender = f"{r.sending_application}/{r.sending_facility}"
        print(f"{row.id:>8}  {r.refused_at:<29}  {r.control_id[:22]:<22}  "
              f"{r.message_type[:9]:<9}  {sender[:30]:<30}  {r.ack_code:<3}  {r.errors_text()}")
    return 0


def _inbox_show(args: argparse.Namespace) -> int:
    from gateway.store.inbox_sqlite import read_entry

    settings = _database(args)
    if settings is not None:
        found = asyncio.run(_on_database(settings, lambda inbox: inbox.get(args.id)))
    else:
        codec = _codec(args)
        if codec is None:
            return 1
        found = asyncio.run(read_entry(inbox_path(args), args.id, codec))
    if found is None:
        print(f"isthmus inbox show: no message with id {args.id}", file=sys.stderr)
        return 1
    entry, raw, ack = found
    refused = record_accesses(args, [message_access("read", args.id, raw, entry.control_id)])
    if refused is not None:
        print(f"isthmus inbox show: {refused}; the message is not shown", file=sys.stderr)
        return 1
    for name in entry.__slots__:
        print(f"{name}: {getattr(entry, name)}")
    print("message:")
    print(_readable(raw))
    print("ack:")
    print(_readable(ack))
    return 0


def _codec(args: argparse.Namespace) -> RowCodec | None:
    """How the data dir's messages are sealed; None after one line saying why it cannot
    be opened (a data key missing or wrong)."""
    from gateway.app.sealing import store_codec
    from gateway.store.sealing import SealError

    try:
        return store_codec(settings_from(args, **{"store.data_dir": args.data_dir}))
    except SealError as exc:
        print(f"isthmus inbox: {exc}", file=sys.stderr)
        return None


def _readable(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")


# -- replay -----------------------------------------------------------------------------


def _inbox_replay(args: argparse.Namespace) -> int:
    from gateway.app.specs import build_router
    from gateway.app.tables import load_translator
    from gateway.ingest.replay import replay_routed
    from gateway.store.inbox import CONFLICT
    from gateway.store.inbox_sqlite import read_raw, record_outcomes

    settings = settings_from(args, **{"store.data_dir": args.data_dir})
    database = _database(args)
    translator = tables_or_exit(lambda: load_translator(settings))
    if translator is None:
        return 2
    ids = None if args.failed else [args.id]
    codec: RowCodec | None = None
    if database is not None:
        rows = asyncio.run(_on_database(database, lambda inbox: inbox.raw_rows(ids)))
    else:
        codec = _codec(args)
        if codec is None:
            return 1
        rows = asyncio.run(read_raw(inbox_path(args), ids, codec=codec))
    if not rows and not args.failed:
        print(f"isthmus inbox replay: no message with id {args.id}", file=sys.stderr)
        return 1
    router = build_router(settings) if settings.routes else None
    # A conflict row was kept undelivered: replaying it owes every backend of its route.
    never_routed = set() if args.failed else {
        row_id for row_id, _, _ in rows if _status(args, row_id, codec) == CONFLICT}
    outcomes = [replay_routed(translator, router, row_id, raw, received,
                              routed=row_id not in never_routed)
                for row_id, raw, received in rows]
    refused = record_accesses(args, [
        message_access("translate", row_id, raw, outcome=outcome.status)
        for (row_id, raw, _), outcome in zip(rows, outcomes, strict=True)])
    if refused is not None:
        print(f"isthmus inbox replay: {refused}; nothing was replayed", file=sys.stderr)
        return 1
    if database is not None:
        asyncio.run(_on_database(database, lambda inbox: inbox.record_outcomes(outcomes)))
    else:
        assert codec is not None  # opened above for the embedded store
        asyncio.run(record_outcomes(inbox_path(args), outcomes, codec))
    for outcome in outcomes:
        routed = f" -> {', '.join(outcome.routes)}" if outcome.routes else ""
        print(f"{outcome.inbox_id} {outcome.status}"
              + (f" {outcome.error}" if outcome.error else "") + routed)
    return 0 if all(o.status in ("translated", "routed") for o in outcomes) else 1


def _status(args: argparse.Namespace, inbox_id: int, codec: RowCodec | None) -> str:
    from gateway.store.inbox_sqlite import read_entry
    from gateway.store.sealing import PLAIN

    settings = _database(args)
    found = asyncio.run(_on_database(settings, lambda inbox: inbox.get(inbox_id))
                        if settings is not None
                        else read_entry(inbox_path(args), inbox_id, codec or PLAIN))
    return found[0].status if found is not None else ""
