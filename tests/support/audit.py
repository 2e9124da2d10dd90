"""Helpers for the audit tests: a log with records, the attacker's view of the database,
and the `isthmus` command line run in-process (gateway.cli.main)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import io
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.app.audit import audit_keys
from gateway.audit.log import AuditLog
from gateway.audit.record import Action, AuditRecord
from gateway.cli import main as cli_main
from gateway.config import Settings, load_settings

AUDIT_DB = "audit.db"
# PHI in the synthetic test data: text that cannot occur by chance in ids, hashes or base64.
CANARY_FAMILY = "CANARYFAMILY"
CANARY_MRN = "MRN-100001"
T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


def settings_for(data_dir: Path, **overrides: Any) -> Settings:
    values = {"store.data_dir": data_dir, "store.synchronous": "normal", **overrides}
    return load_settings(None, environ={}, overrides=values)


async def open_log(data_dir: Path, *, gateway: bool = True, clock: Any = None,
                   **overrides: Any) -> AuditLog:
    """The audit log of a data dir, keys generated there on first use (like serve)."""
    settings = settings_for(data_dir, **overrides)
    keys = audit_keys(settings, create=True)
    kwargs: dict[str, Any] = {"checkpoints": gateway, "synchronous": "normal"}
    if clock is not None:
        kwargs["clock"] = clock
    return await AuditLog.open(data_dir / AUDIT_DB, keys, **kwargs)


def ingest_record(number: int, *, patient: str | None = None,
                  time: datetime | None = None, **fields: Any) -> AuditRecord:
    """A synthetic MLLP ingest record (patient MRN-<n % 3> at SYNTHHOSP by default)."""
    values: dict[str, Any] = {
        "client_id": "SYNTHLAB|SYNTHHOSP", "sending_application": "SYNTHLAB",
        "sending_facility": "SYNTHHOSP", "peer": "127.0.0.1:40000",
        "resource_type": "ADT^A01", "control_id": f"CTRL-{number:04d}",
        "patient": patient if patient is not None else f"SYNTHHOSP|MRN-{number % 3}",
        "time": time or T0 + timedelta(minutes=number),
    }
    values.update(fields)
    return AuditRecord(Action.INGEST, **values)


async def write_records(log: AuditLog, first: int, last: int, **fields: Any) -> None:
    for number in range(first, last + 1):
        await log.record(ingest_record(number, **fields))


def attacker(data_dir: Path) -> sqlite3.Connection:
    """The database as someone with file access sees it: the append-only guard dropped."""
    db = sqlite3.connect(data_dir / AUDIT_DB, isolation_level=None)
    db.execute("DROP TRIGGER IF EXISTS audit_record_no_update")
    db.execute("DROP TRIGGER IF EXISTS audit_record_no_delete")
    return db


def rechain(db: sqlite3.Connection, from_seq: int) -> None:
    """Recompute the public chain hashes from `from_seq` on (what a forger can do without
    the audit key), leaving MACs and signatures as they are."""
    prev = db.execute("SELECT hash FROM audit_record WHERE seq = ?",
                      (from_seq - 1,)).fetchone()[0]
    for seq, body in db.execute("SELECT seq, body FROM audit_record WHERE seq >= ? "
                                "ORDER BY seq", (from_seq,)).fetchall():
        prev = hashlib.sha256(prev + seq.to_bytes(8, "big")
                              + hashlib.sha256(body).digest()).digest()
        db.execute("UPDATE audit_record SET hash = ? WHERE seq = ?", (prev, seq))


def run_cli(*args: str) -> tuple[int, str, str]:
    """`isthmus ARGS` in this process: exit code, stdout, stderr (like the real console).

    From inside a running event loop (async tests) the command runs in a thread of its own,
    since it starts its own loop; the test's loop waits meanwhile.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_cli(args)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_run_cli, args).result()


def _run_cli(args: tuple[str, ...]) -> tuple[int, str, str]:
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(list(args))
        except SystemExit as exc:  # argparse errors
            code = int(exc.code or 0)
    out.flush()
    return code, out.buffer.getvalue().decode(), err.getvalue()  # type: ignore[attr-defined]
