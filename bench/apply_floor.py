"""The FHIR store's floor: what SQLite alone costs for the rows an applied message writes.

What is measured
----------------
A gateway (``python -m gateway serve``, defaults: a sealed store, ``synchronous = full``)
takes ``--messages`` synthetic ADT^A01, each about a new patient, and applies them; then it
is stopped and the rows its FHIR store holds are read back as they are on disk (resources
and index rows; the schema's triggers write the versions and change events). Those rows are
inserted again into a fresh store made by the writer's own ``open_writer`` (same schema,
triggers and pragmas), ``--batch`` messages a transaction, with ``executemany``: no
translation, no sealing, no index computation, none of our Python but the loop handing
SQLite the rows. What that costs is a floor under any apply on this schema, whatever the
Python above it does.

Printed per variant: CPU per message (user and system), wall time per message, bytes the
process wrote per message (``/proc/self/io`` ``wchar``: the WAL's pages and the
checkpoints'), and the cores that CPU would take at 3,000 msg/s.

The peer, in the same run: the same rows with every key value (resource ids, blind string
values, token codes, reference targets) replaced by a counter in order of first use, so
every B-tree grows at its right edge. The difference is what the random keys cost: a row
whose key lands on a page no other row in the transaction touched dirties that page, and
the commit writes it to the WAL and a checkpoint writes it again. A third line leaves out
the string index rows (the sealed store's blind prefixes), to show their share.

    python bench/apply_floor.py --messages 6000 --batch 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from apply_lag import KEY, client, start_gateway  # noqa: E402

from gateway.store.fhir_sqlite.schema import open_writer  # noqa: E402

# Tables a message's apply inserts into; fhir_version and fhir_event come from triggers.
TABLES = ("fhir_resource", "fhir_token", "fhir_string", "fhir_date", "fhir_reference",
          "fhir_quantity")
# The columns that are keys of some index: resource ids and the values searched by.
KEY_COLUMNS = {"id", "normalized", "exact", "code", "target"}
Rows = dict[str, list[tuple[Any, ...]]]


async def load(mllp: int, http: int, messages: int, connections: int) -> None:
    """Send the messages and wait until every one is applied (one Provenance each)."""
    numbers = list(range(messages))
    shares = [numbers[i::connections] for i in range(connections)]
    prefix = f"F{os.getpid()}-"
    await asyncio.gather(*(client(mllp, share, prefix, {}, []) for share in shares))
    url = f"http://127.0.0.1:{http}/fhir/Provenance?_summary=count"
    async with aiohttp.ClientSession(headers={"X-API-Key": KEY}) as session:
        while True:
            async with session.get(url) as response:
                if int((await response.json(content_type=None))["total"]) >= messages:
                    return
            await asyncio.sleep(0.5)


def read_rows(path: Path) -> tuple[Rows, dict[str, list[str]], int]:
    """Every inserted row of the store at `path`, in the order written, and the messages."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows: Rows = {}
        columns: dict[str, list[str]] = {}
        for table in TABLES:
            cursor = db.execute(f"SELECT * FROM {table} ORDER BY rowid")
            columns[table] = [d[0] for d in cursor.description]
            rows[table] = cursor.fetchall()
        messages = db.execute(
            "SELECT count(*) FROM fhir_resource WHERE type = 'Provenance'").fetchone()[0]
    finally:
        db.close()
    return rows, columns, int(messages)


def sequential_keys(rows: Rows, columns: dict[str, list[str]]) -> Rows:
    """The same rows with each distinct key value replaced by a counter, in first-use order."""
    counters: dict[str, dict[Any, str]] = {}
    out: Rows = {}
    for table, table_rows in rows.items():
        keyed = [i for i, name in enumerate(columns[table]) if name in KEY_COLUMNS]
        renamed = []
        for row in table_rows:
            values = list(row)
            for i in keyed:
                if values[i] is None or values[i] == "":
                    continue
                seen = counters.setdefault(columns[table][i], {})
                values[i] = seen.setdefault(values[i], f"{len(seen):020d}")
            renamed.append(tuple(values))
        out[table] = renamed
    return out


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def insert_all(path: Path, rows: Rows, messages: int, batch: int,
               skip: Sequence[str] = ()) -> dict[str, float]:
    """Insert `rows` into a fresh store at `path`, `batch` messages a transaction."""
    db, _ = open_writer(path, "full")
    statements = {table: f"INSERT INTO {table} VALUES "
                         f"({', '.join('?' * len(table_rows[0]))})"
                  for table, table_rows in rows.items() if table_rows}
    times_before, wall_before, bytes_before = os.times(), time.perf_counter(), written_bytes()
    try:
        for start in range(0, messages, batch):
            end = min(messages, start + batch)
            db.execute("BEGIN")
            for table, statement in statements.items():
                if table in skip:
                    continue
                table_rows = rows[table]
                # Rows are in the order written, so a proportional slice is ~these messages'.
                db.executemany(statement, table_rows[len(table_rows) * start // messages:
                                                      len(table_rows) * end // messages])
            db.execute("COMMIT")
    finally:
        db.close()
    times_after = os.times()
    return {"user": (times_after.user - times_before.user) / messages * 1e6,
            "system": (times_after.system - times_before.system) / messages * 1e6,
            "wall": (time.perf_counter() - wall_before) / messages * 1e6,
            "written": (written_bytes() - bytes_before) / messages / 1024}


def report(name: str, figures: dict[str, float]) -> None:
    cpu = figures["user"] + figures["system"]
    print(f"{name:<34} {cpu:7.0f} {figures['user']:7.0f} {figures['system']:7.0f} "
          f"{figures['wall']:8.0f} {figures['written']:8.1f} {cpu * 3000 / 1e6:9.2f}")


def measure(args: argparse.Namespace, workdir: Path) -> None:
    proc, mllp, http = start_gateway(workdir, None)
    try:
        asyncio.run(load(mllp, http, args.messages, args.connections))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    rows, columns, messages = read_rows(workdir / "var" / "fhir.db")
    print(f"messages {messages}  batch {args.batch} per transaction  rows per message: "
          + ", ".join(f"{table.removeprefix('fhir_')} {len(r) / messages:.1f}"
                      for table, r in rows.items()))
    print(f"{'variant':<34} {'cpu us':>7} {'user':>7} {'system':>7} {'wall us':>8} "
          f"{'KiB wr':>8} {'cores@3k':>9}")
    variants: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("rows as stored (the floor)",
         lambda: insert_all(workdir / "floor.db", rows, messages, args.batch)),
        ("peer: sequential keys",
         lambda: insert_all(workdir / "sequential.db", sequential_keys(rows, columns),
                            messages, args.batch)),
        ("rows as stored, no string rows",
         lambda: insert_all(workdir / "nostring.db", rows, messages, args.batch,
                            skip=("fhir_string",))),
    ]
    for name, run in variants:
        report(name, run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="messages per transaction")
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="isthmus-floor-"))
    os.chmod(workdir, 0o700)
    try:
        measure(args, workdir)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
