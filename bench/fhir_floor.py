"""The floor under a durably audited FHIR read in Python, beside the bare aiohttp ceiling.

What is measured
----------------
Issue 15 asks a read by id, with the default durable audit, for half the req/s of a bare
aiohttp handler. This measures the least any Python server on aiohttp can do for such a
read, in the same run as that bare handler, with the same client (``fhir_rest.py``'s):

- ``ceil bare aiohttp``: ``fhir_rest.py --bare-server``, one route answering every read
  with the same fixed Patient bytes;
- ``floor durable read``: a server written here for nothing but speed that does what a
  sealed, durably audited read cannot skip, and nothing else: find the API key (a dict
  lookup, as if its hash were cached), ``SELECT`` the body by primary key on the event
  loop's thread, open it (AES-256-GCM, the associated data naming the row), then build an
  audit record (a small JSON object: who, what, when, outcome), seal it (AES-256-GCM),
  link it to the previous record (SHA-256 over the previous link and the sealed bytes),
  and answer only once the record is committed: one writer thread inserts every record
  waiting and commits (WAL, ``synchronous = full``), group commits as large as the load
  makes them. No authorization policy, no OperationOutcome, no telemetry, no signed
  checkpoints, no FHIR headers beyond the bare handler's: each of those is more.

Two more rows take it apart: the same server answering once the record is queued for
the next group commit (``audit queued``), and with no record at all (``audit none``).

Printed per row as ``fhir_rest.py`` prints them (req/s, p50/p99, server CPU us per
request), and the floor's req/s as a share of the ceiling's: the most a read with a
durable audit record can reach against that ceiling in Python on this machine.

    python bench/fhir_floor.py --seconds 3 --connections 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# bench/ is on sys.path when this file runs as a script (and in the spawned clients).
from fhir_rest import (
    BARE_LAST_MODIFIED,
    BARE_READY_RE,
    FHIR_JSON,
    READ_EXPECT,
    TARGET_CONNECTIONS,
    TARGET_READ_RATIO,
    PhaseResult,
    Target,
    bare_argv,
    bench_scenario,
    build_request,
    print_summary,
    serve_until_signal,
    synthetic_patient,
)
from mllp_ingest import BenchError, ServerProcess, parse_connections, started

PATIENTS = 1000


def patient_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def patient_body(n: int) -> bytes:
    resource = {"resourceType": "Patient", "id": patient_id(n),
                "meta": {"versionId": "1", "lastUpdated": "2026-11-26T12:00:00.000000Z"},
                **{k: v for k, v in synthetic_patient(n).items() if k != "resourceType"}}
    return json.dumps(resource, separators=(",", ":")).encode()


def make_store(path: Path, key: bytes) -> None:
    """PATIENTS Patients, each body sealed with AES-256-GCM, its row named in the AAD."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(key)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE fhir_resource (type TEXT NOT NULL, id TEXT NOT NULL, "
                   "version INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY (type, id))")
        rows = []
        for n in range(1, PATIENTS + 1):
            nonce = os.urandom(12)
            sealed = nonce + aead.encrypt(nonce, patient_body(n), f"Patient/{patient_id(n)}"
                                          .encode())
            rows.append(("Patient", patient_id(n), 1, sealed))
        db.execute("BEGIN")
        db.executemany("INSERT INTO fhir_resource VALUES (?, ?, ?, ?)", rows)
        db.execute("COMMIT")
    finally:
        db.close()


class DurableAudit:
    """Sealed, chained records, each acknowledged once its group commit is durable."""

    def __init__(self, path: Path, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE audit (seq INTEGER PRIMARY KEY, at TEXT NOT NULL, "
                         "record BLOB NOT NULL, link BLOB NOT NULL)")
        self._link = bytes(32)
        self._waiting: list[tuple[str, bytes, bytes]] = []
        self._futures: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._commit_loop())

    def record(self, who: str, what: str) -> asyncio.Future[None]:
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        plain = json.dumps({"who": who, "action": "R", "what": what, "when": at,
                            "outcome": "0"}, separators=(",", ":")).encode()
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, plain, b"audit")
        self._link = hashlib.sha256(self._link + sealed).digest()
        self._waiting.append((at, sealed, self._link))
        future = asyncio.get_running_loop().create_future()
        self._futures.append(future)
        self._wake.set()
        return future

    def _write(self, rows: list[tuple[str, bytes, bytes]]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany("INSERT INTO audit (at, record, link) VALUES (?, ?, ?)", rows)
        self._db.execute("COMMIT")

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            rows, futures = self._waiting, self._futures
            self._waiting, self._futures = [], []
            await loop.run_in_executor(None, self._write, rows)
            for future in futures:
                if not future.done():
                    future.set_result(None)

    def close(self) -> None:
        self._task.cancel()
        self._db.close()


async def serve_floor(host: str, port: int, workdir: Path, api_key: str, mode: str) -> None:
    from aiohttp import web
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    store_key, audit_key = os.urandom(32), os.urandom(32)
    make_store(workdir / f"floor-store-{mode}.db", store_key)
    aead = AESGCM(store_key)
    store = sqlite3.connect(workdir / f"floor-store-{mode}.db", isolation_level=None)
    audit = DurableAudit(workdir / f"floor-audit-{mode}.db", audit_key)
    clients = {api_key: "bench"}  # the key's hash, looked up once and cached
    select = "SELECT version, body FROM fhir_resource WHERE type = ? AND id = ?"

    async def read(request: web.Request) -> web.Response:
        who = clients.get(request.headers.get("X-API-Key", ""))
        if who is None:
            return web.Response(status=401)
        id_ = request.match_info["id"]
        row = store.execute(select, ("Patient", id_)).fetchone()
        if row is None:
            return web.Response(status=404)
        sealed = row[1]
        body = aead.decrypt(sealed[:12], sealed[12:], f"Patient/{id_}".encode())
        if mode != "none":
            recorded = audit.record(who, f"Patient/{id_}")
            if mode == "durable":
                await recorded
        return web.Response(body=body, content_type=FHIR_JSON, headers={
            "ETag": f'W/"{row[0]}"', "Last-Modified": BARE_LAST_MODIFIED})

    app = web.Application()
    app.router.add_get("/fhir/Patient/{id}", read)
    try:
        await serve_until_signal(app, host, port, "isthmus-bare")
    finally:
        audit.close()
        store.close()


def bench_server(name: str, argv: list[str], workdir: Path, key: str,
                 args: argparse.Namespace) -> list[PhaseResult]:
    server = ServerProcess(name, argv, BARE_READY_RE, workdir)
    with started(server, args.startup_timeout) as (host, port):
        print(f"\n{name}: pid {server.pid} at {host}:{port}", flush=True)
        reads = Target(host, port, [build_request(host, port, f"/fhir/Patient/{patient_id(n)}",
                                                  key) for n in range(1, PATIENTS + 1)],
                       READ_EXPECT, server.pid)
        return bench_scenario(name, reads, args)


def run(args: argparse.Namespace) -> int:
    key = "bench-" + secrets.token_urlsafe(24)
    workdir = Path(tempfile.mkdtemp(prefix="isthmus-bench-floor-"))
    try:
        body_file = workdir / "patient.json"
        body_file.write_bytes(patient_body(1))
        ceiling = bench_server("ceil bare aiohttp", bare_argv(body_file, None), workdir, key,
                               args)
        floor: list[PhaseResult] = []
        for mode in ("none", "queued", "durable"):
            floor += bench_server(f"floor read, audit {mode}",
                                  [sys.executable, str(Path(__file__).resolve()),
                                   "--floor-server", "--workdir", str(workdir), "--key", key,
                                   "--mode", mode], workdir, key, args)
    except BenchError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_summary([*ceiling, *floor], ceiling)
    for row in floor:
        if row.connections == TARGET_CONNECTIONS and row.scenario.endswith("durable"):
            best = next(c for c in ceiling if c.connections == row.connections)
            print(f"\nfloor / ceiling at {row.connections} connections: "
                  f"{row.rate / best.rate:.2f} (issue 15's read target: "
                  f">= {TARGET_READ_RATIO})")
    return 1 if any(r.errors for r in [*ceiling, *floor]) else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=parse_connections, default=[8])
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--client-procs", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--floor-server", action="store_true",
                        help="run only the floor server (prints its port) until SIGTERM")
    parser.add_argument("--workdir", type=Path, help="--floor-server: where its files go")
    parser.add_argument("--key", help="--floor-server: the API key it accepts")
    parser.add_argument("--mode", choices=("durable", "queued", "none"), default="durable",
                        help="--floor-server: answer after the record's commit, after it is "
                             "queued, or with no record")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.floor_server:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_floor("127.0.0.1", 0, args.workdir, args.key, args.mode))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
