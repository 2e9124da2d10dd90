"""Inbound webhooks benchmark for the Isthmus gateway (a benchmark, not a test).

What is measured
----------------
A gateway (``python -m gateway --config FILE serve``, fresh temp data dir, the store
sealed as by default) has one FHIR backend, ``bench/forward.py``'s fake backend in its own
process (``GET /fhir/Patient/{id}`` answers one synthetic Patient), declaring
``webhook = { secret_env, event_id = "/id", resource = "/focus/reference" }``.

1. Accept: ``--events`` (default 2000) distinct events, each signed with HMAC-SHA256 in
   advance (the client's cost stays out of the figure), are POSTed to
   ``/webhooks/ehr`` over ``--connections`` (default 4) keep-alive connections, one
   request outstanding per connection; every answer must be 202. Printed: events/s and
   p50/p99 of the answer. The peer in the same run: as many ``GET /healthz`` through the
   same client and connections (the gateway's HTTP stack with nothing behind it).
2. Fetch and store: from the first POST until ``webhooks.db`` lists every event
   ``done`` (each one a GET to the backend, the vendor-free answer checked against R4 and
   written to the sealed local store): events/s. The peer: the same number of GETs sent
   straight to the fake backend, one at a time as the fetcher sends them.

How to run
----------
    python bench/webhooks_in.py
    python bench/webhooks_in.py --events 5000 --connections 8

The machine's load (``os.getloadavg``) is printed with the figures; compare a figure only
with its peer from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp
import orjson

# bench/ is on sys.path when this file runs as a script.
from forward import FAKE_READY_RE, HTTP_READY_RE, fake_argv, free_port
from mllp_ingest import BenchError, ServerProcess, percentile, started

SECRET = "synthetic-bench-webhook-secret"


def config_text(backend_port: int) -> str:
    return "\n".join([
        "[processes]", "workers = 0", "",
        "[[backends]]", 'name = "ehr"', 'kind = "fhir"',
        f'base_url = "http://127.0.0.1:{backend_port}/fhir"',
        'webhook = { secret_env = "BENCH_WEBHOOK_SECRET", event_id = "/id", '
        'resource = "/focus/reference" }', ""])


def signed_events(count: int, tag: str) -> list[tuple[bytes, str]]:
    events = []
    for n in range(count):
        body = orjson.dumps({"id": f"{tag}-{n}", "type": "resource.updated",
                             "focus": {"reference": f"Patient/bench-{n % 500}"}})
        digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        events.append((body, f"sha256={digest}"))
    return events


async def timed(count: int, connections: int,
                one: Callable[[int], Awaitable[int]]) -> tuple[float, list[int], int]:
    """Run `one(i)` for i in range(count) on `connections` lanes: seconds, latencies
    (ns, sorted) and how many did not answer as expected."""
    latencies: list[int] = []
    bad = 0
    queue = iter(range(count))

    async def lane() -> None:
        nonlocal bad
        for i in queue:
            began = time.perf_counter_ns()
            ok = await one(i)
            latencies.append(time.perf_counter_ns() - began)
            bad += 0 if ok else 1

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(connections)))
    return time.perf_counter() - began, sorted(latencies), bad


def done_count(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM webhook_event WHERE status = 'done'"
                               ).fetchone()
            return int(row[0])
    except sqlite3.Error:
        return 0


def row(label: str, count: int, seconds: float, latencies: Sequence[int], bad: int) -> str:
    p50 = percentile(latencies, 50) / 1e6 if latencies else float("nan")
    p99 = percentile(latencies, 99) / 1e6 if latencies else float("nan")
    return (f"{label:<34} {count:>6} {seconds:>8.2f} {count / seconds:>9.0f} "
            f"{p50:>8.2f} {p99:>8.2f} {bad:>5}")


async def measure(args: argparse.Namespace, gateway: str, backend: str, data_dir: Path
                  ) -> list[str]:
    events = signed_events(args.events, f"run{int(time.time())}")
    connector = aiohttp.TCPConnector(limit=args.connections)
    lines = [f"{'':<34} {'count':>6} {'seconds':>8} {'per s':>9} {'p50 ms':>8} "
             f"{'p99 ms':>8} {'bad':>5}"]
    async with aiohttp.ClientSession(connector=connector) as http:

        async def post(i: int) -> int:
            body, signature = events[i]
            async with http.post(f"{gateway}/webhooks/ehr", data=body, headers={
                    "X-Signature": signature, "Content-Type": "application/json"}) as answer:
                await answer.read()
                return answer.status == 202

        async def healthz(i: int) -> int:
            async with http.get(f"{gateway}/healthz") as answer:
                await answer.read()
                return answer.status == 200

        async def direct(i: int) -> int:
            async with http.get(f"{backend}/fhir/Patient/bench-{i % 500}") as answer:
                await answer.read()
                return answer.status == 200

        await timed(50, 1, healthz)  # warm-up
        peer = await timed(args.events, args.connections, healthz)
        began = time.perf_counter()
        accepted = await timed(args.events, args.connections, post)
        db = data_dir / "webhooks.db"
        deadline = time.monotonic() + args.timeout
        while done_count(db) < args.events:
            if time.monotonic() > deadline:
                raise BenchError(f"only {done_count(db)} of {args.events} events done "
                                 f"after {args.timeout:g} s")
            await asyncio.sleep(0.05)
        stored = time.perf_counter() - began
        fetch_peer = await timed(args.events, 1, direct)
    lines.append(row(f"accept POST /webhooks ({args.connections} conns)", args.events,
                     *accepted))
    lines.append(row(f"peer GET /healthz ({args.connections} conns)", args.events, *peer))
    lines.append(row("fetched+stored (first POST->done)", args.events, stored, [], 0))
    lines.append(row("peer GET backend directly (1 conn)", args.events, *fetch_peer))
    return lines


def run(args: argparse.Namespace) -> int:
    os.environ["BENCH_WEBHOOK_SECRET"] = SECRET
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-hooks-") as tmp:
        work = Path(tmp)
        port = free_port()
        fake = ServerProcess("fake-ehr", [*fake_argv(port)], FAKE_READY_RE, work)
        with started(fake, 20) as (fake_host, fake_port):
            config = work / "isthmus.toml"
            config.write_text(config_text(fake_port))
            data_dir = work / "data"
            argv = [sys.executable, "-m", "gateway", "--config", str(config), "serve",
                    "--host", "127.0.0.1", "--mllp-port", "0", "--http-port", "0",
                    "--data-dir", str(data_dir)]
            gateway = ServerProcess("gateway", argv, HTTP_READY_RE, work)
            with started(gateway, 60) as (host, http_port):
                lines = asyncio.run(measure(args, f"http://{host}:{http_port}",
                                            f"http://{fake_host}:{fake_port}", data_dir))
    print(f"load average before/after: {args.load:.2f} / {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} cores)")
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    args.load = os.getloadavg()[0]
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
