"""Audit trail benchmark for the Isthmus gateway (a benchmark, not a test).

What is measured
----------------
1. Appends per second with group commit: an AuditLog on a fresh database in a temp dir
   (WAL, ``synchronous=full`` as the gateway's default) takes ``--records`` synthetic
   MLLP-ingest records (PHI encrypted, blind-indexed, chained, MAC'd) from ``--producers``
   concurrent producers, each submitting ``--burst`` records and waiting for them, as
   concurrent MLLP connections do. Reported: records/s, group commits and records per
   commit. Each record is sealed exactly as the gateway seals one.
2. The overhead of auditing on MLLP ingest: the gateway is started twice per round, with
   the audit trail on and off (``ISTHMUS_AUDIT__ENABLED=false``), and driven by the same
   client as ``bench/mllp_ingest.py`` (lock-step connections from separate processes,
   unique control ids). Rounds alternate on/off so drift hits both alike; the median
   msg/s of each side per connection count gives the overhead.

Targets (informational; the exit status is 0 unless something failed): >= 20,000
records/s, and an ingest overhead <= 10 % at 8 connections.

How to run
----------
    python bench/audit.py                       # both parts
    python bench/audit.py --appends-only --records 200000
    python bench/audit.py --ingest-only --rounds 5 --messages 10000 --connections 8
    make bench-audit
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

TARGET_APPENDS = 20_000.0
TARGET_OVERHEAD = 0.10
TARGET_CONNECTIONS = 8


def _ingest_bench() -> ModuleType:
    """bench/mllp_ingest.py as a module: its client, phases and server handling."""
    spec = importlib.util.spec_from_file_location("mllp_ingest", Path(__file__).parent
                                                  / "mllp_ingest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mllp_ingest"] = module  # spawned client processes import it by this name
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- appends


async def _appends(records: int, producers: int, burst: int, synchronous: str,
                   workdir: Path) -> tuple[float, int]:
    from gateway.audit.keys import load_keys
    from gateway.audit.log import AuditLog
    from gateway.audit.record import Action, AuditRecord

    keys, _ = load_keys(default_dir=workdir / "keys", key_file=None, keys_text=None,
                        signing_key_file=None, signing_key_text=None, create=True)
    log = await AuditLog.open(workdir / "audit.db", keys, synchronous=synchronous)  # type: ignore[arg-type]
    per_producer = records // producers

    async def producer(number: int) -> None:
        for start in range(0, per_producer, burst):
            futures = [log.submit(AuditRecord(
                Action.INGEST, client_id="BENCHAPP|BENCHFAC", sending_application="BENCHAPP",
                sending_facility="BENCHFAC", peer="127.0.0.1:40000", resource_type="ADT^A01",
                control_id=f"B{number:04d}{i:010d}", patient=f"BENCHFAC|BM{number}-{i}"))
                for i in range(start, min(start + burst, per_producer))]
            for future in futures:
                await future

    started = time.perf_counter()
    await asyncio.gather(*(producer(n) for n in range(producers)))
    seconds = time.perf_counter() - started
    batches = log.store.batches_committed  # type: ignore[attr-defined]
    await log.close()
    return per_producer * producers / seconds, batches


def bench_appends(args: argparse.Namespace, workdir: Path) -> float:
    print(f"\nappends: {args.records} records, {args.producers} producers, bursts of "
          f"{args.burst}, synchronous={args.synchronous}", flush=True)
    rates = []
    for run in range(args.repeat):
        directory = workdir / f"appends-{run}"
        directory.mkdir()
        rate, batches = asyncio.run(_appends(args.records, args.producers, args.burst,
                                             args.synchronous, directory))
        rates.append(rate)
        print(f"  run {run + 1}: {rate:>9.0f} records/s, {batches} group commits "
              f"({args.records / max(batches, 1):.0f} records per commit)", flush=True)
    best = statistics.median(rates)
    verdict = "PASS" if best >= TARGET_APPENDS else "MISS"
    print(f"appends: median {best:.0f} records/s (target >= {TARGET_APPENDS:.0f}: {verdict})")
    return best


# --------------------------------------------------------------------------- ingest


def bench_ingest(args: argparse.Namespace, workdir: Path) -> dict[int, tuple[float, float]]:
    ingest = _ingest_bench()
    settings = ingest.Settings(prefix=b"A" + secrets.token_hex(4).upper().encode(),
                               timestamp=time.strftime("%Y%m%d%H%M%S"),
                               ack_timeout=30.0, connect_timeout=10.0)
    ids = ingest.IdAllocator()
    rates: dict[tuple[bool, int], list[float]] = {}
    print(f"\ningest: {args.messages} messages per connection count, connections "
          f"{','.join(map(str, args.connections))}, {args.rounds} rounds of audit on/off, "
          f"{os.cpu_count()} cores", flush=True)
    print(f"{'audit':<6} {'round':>5} " + ingest.HEADER, flush=True)
    for number in range(args.rounds):
        order = (True, False) if number % 2 == 0 else (False, True)
        for audit in order:
            results = _ingest_run(ingest, audit, args, workdir / f"ingest-{number}-{audit}",
                                  ids, settings)
            for result in results:
                rates.setdefault((audit, result.connections), []).append(result.rate)
                print(f"{'on' if audit else 'off':<6} {number + 1:>5} "
                      f"{ingest.format_row(result)}", flush=True)
                if result.negative:
                    print(f"       negative ACKs: {result.negative}", flush=True)
    summary: dict[int, tuple[float, float]] = {}
    print(f"\n{'conns':>5} {'audit off msg/s':>16} {'audit on msg/s':>15} {'overhead':>9}")
    for connections in args.connections:
        off = statistics.median(rates[(False, connections)])
        on = statistics.median(rates[(True, connections)])
        summary[connections] = (off, on)
        print(f"{connections:>5} {off:>16.0f} {on:>15.0f} {1 - on / off:>8.1%}")
    at = summary.get(TARGET_CONNECTIONS)
    if at is not None:
        overhead = 1 - at[1] / at[0]
        verdict = "PASS" if overhead <= TARGET_OVERHEAD else "MISS"
        print(f"ingest overhead at {TARGET_CONNECTIONS} connections: {overhead:.1%} "
              f"(target <= {TARGET_OVERHEAD:.0%}: {verdict})")
    return summary


def _ingest_run(ingest: ModuleType, audit: bool, args: argparse.Namespace, data_dir: Path,
                ids: Any, settings: Any) -> list[Any]:
    data_dir.mkdir(parents=True, mode=0o700)
    saved = os.environ.get("ISTHMUS_AUDIT__ENABLED")
    os.environ["ISTHMUS_AUDIT__ENABLED"] = "true" if audit else "false"
    try:
        server = ingest.ServerProcess("gateway", ingest.gateway_argv(data_dir),
                                      ingest.GATEWAY_READY_RE, data_dir)
        with ingest.started(server, 60.0) as (host, port):
            if args.warmup:
                ingest.run_phase("gateway", host, port, 1, args.warmup, 1, ids, settings)
            return [ingest.run_phase("gateway", host, port, connections, args.messages,
                                     ingest.auto_client_procs(connections), ids, settings,
                                     server.pid)
                    for connections in args.connections]
    finally:
        if saved is None:
            os.environ.pop("ISTHMUS_AUDIT__ENABLED", None)
        else:
            os.environ["ISTHMUS_AUDIT__ENABLED"] = saved


# --------------------------------------------------------------------------- driver


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Audit trail benchmark: appends/s and the "
                                                 "overhead of auditing on MLLP ingest.")
    parser.add_argument("--records", type=int, default=100_000, help="records to append")
    parser.add_argument("--producers", type=int, default=64,
                        help="concurrent producers (like MLLP connections)")
    parser.add_argument("--burst", type=int, default=16,
                        help="records each producer submits before waiting for them")
    parser.add_argument("--synchronous", choices=("normal", "full"), default="full")
    parser.add_argument("--repeat", type=int, default=3, help="append runs (median shown)")
    parser.add_argument("--messages", type=int, default=10_000,
                        help="MLLP messages per connection count and run")
    parser.add_argument("--connections", type=lambda t: [int(c) for c in t.split(",")],
                        default=[1, 8, 64], help="comma-separated connection counts")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating audit on/off rounds (median shown)")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--appends-only", action="store_true")
    parser.add_argument("--ingest-only", action="store_true")
    args = parser.parse_args(argv)
    if args.appends_only and args.ingest_only:
        parser.error("--appends-only and --ingest-only exclude each other")
    if args.producers < 1 or args.records < args.producers or args.burst < 1:
        parser.error("need --records >= --producers >= 1 and --burst >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="isthmus-audit-bench-"))
    try:
        if not args.ingest_only:
            bench_appends(args, workdir)
        if not args.appends_only:
            bench_ingest(args, workdir)
    except Exception as exc:
        print(f"\nerror: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
