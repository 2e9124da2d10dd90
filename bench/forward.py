"""Forwarding benchmark for the Isthmus gateway (a benchmark, not a test).

What is measured
----------------
1. Facade latency. ``GET /fhir/Patient/<id>`` (``X-API-Key`` header) is sent to the
   gateway, which proxies it to a fake FHIR backend (``[[routes]] match = { resource =
   "Patient" }``, ``cache_ttl = 0`` so that every read makes the round trip: what is
   measured is the proxy, not its cache), and in the same run, with the same requests,
   DIRECTLY to that fake backend. Each row runs ``--seconds`` (default 5) after a
   ``--warmup`` (default 1 s) on each path, at 1 connection (the latency figure) and at 8
   connections (``--connections``). The client is ``bench/fhir_rest.py``'s: keep-alive
   HTTP/1.1, one request outstanding per connection, round trips timed with
   ``perf_counter_ns``, in a process of its own. Printed per row: requests, req/s,
   p50/p99, errors (non-2xx or no Patient in the body), and from ``/proc`` the CPU
   microseconds per request used by the gateway and by the fake backend. Then the latency
   the gateway adds (gateway minus direct) at p50 and p99, and the target line "added p50
   <= 1 ms, p99 <= 3 ms" (at 1 connection) with PASS or MISS.

2. Outbox drain rate. A second gateway, on a fresh data dir (``[store] synchronous``:
   ``--synchronous``, default "full"), routes ``ADT^*`` to a fake backend whose port is
   chosen but which is not running yet: the backend is down. ``--messages`` (default
   5000) distinct ADT^A01 (``tests/messages/adt_a01.hl7`` with MRN-100001 and the control
   id replaced, for ``--patients`` (default 100) patients, each patient's messages on one
   connection in order) are sent over ``--mllp-connections`` (default 4) MLLP connections
   in pipelined windows of ``--window`` (default 32) frames; every ACK must be AA for its
   own control id. The ingest rate (the backend down) is printed, and the outbox must hold
   one pending row per message (``SELECT count(*) FROM outbox WHERE status='pending'`` on
   ``DATA_DIR/inbox.db``). Then the fake backend is started on its port and the script
   polls its ``GET /count`` and the pending count until it has received every
   transaction (each a transaction Bundle POSTed to the base, ``X-Request-Id:
   isthmus-outbox-N``; the fake counts them and the distinct request ids, and notes the
   CLOCK_MONOTONIC time of the first and the last) and no row is pending. Printed: the
   time from the backend coming up to the first delivery (the breaker's reset and the
   retry backoff, 0.2 s at most here), the drain rate from the first to the last
   delivery (deliveries/s, compared with the target ">= 2,000 deliveries/s to a fast
   backend"), the overall rate from backend up to the last delivery, the time until no
   row is pending, duplicates, and the CPU both processes used per delivery.

The fake FHIR backend is this script with ``--fake-backend --port P``: a bare aiohttp
server, in its own process, answering ``GET /fhir/Patient/{id}`` with a fixed synthetic
Patient (invented data; its id is the one asked for) as ``application/fhir+json``,
``POST /fhir`` with a minimal transaction-response Bundle (200), and ``GET /count`` with
what it has received (JSON). It prints ``isthmus-fake-ehr listening http=HOST:PORT``.

Both gateways are started as ``python -m gateway --config FILE serve --host 127.0.0.1
--mllp-port 0 --http-port 0 --data-dir DIR`` (FILE and DIR in a temp dir; one API key
with ``system/*.cruds``, ``[fhir] audit_reads = "off"``, one ``kind = "fhir"`` backend
on a loopback ``http://`` URL with short retry and breaker timings:
``backoff_base = 0.02``, ``retry_max_delay = 0.2``, ``breaker_reset = 0.2``,
``max_attempts = 1000``). Every process started is stopped with SIGTERM (SIGKILL after
10 s); the temp dir is removed at the end unless ``--keep-tmp``.

How to run
----------
    python bench/forward.py                          # both parts (~45 s on 2 cores)
    python bench/forward.py --seconds 3 --messages 2000
    python bench/forward.py --facade-only            # or --drain-only
    python bench/forward.py --synchronous normal     # the drain gateway's [store]
    python bench/forward.py --fake-backend --port 8099   # just the fake backend
    make bench-forward

The target lines are informational: the exit status is 0 unless something errored (a
process did not start, a request was answered with an error, an ACK was not AA, the
outbox did not hold or did not drain every message, a transaction arrived twice), then 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# bench/ is on sys.path when this file runs as a script (and in the spawned clients).
from fhir_rest import (
    FHIR_JSON,
    READ_EXPECT,
    PhaseResult,
    Target,
    build_request,
    machine_cpu_seconds,
    run_phase,
    serve_until_signal,
)
from mllp_ingest import (
    END_BLOCK,
    REPO_ROOT,
    START_BLOCK,
    BenchError,
    ServerProcess,
    parse_connections,
    parse_msa,
    process_cpu_seconds,
    started,
)

HTTP_READY_RE = re.compile(r"^isthmus listening mllp=\S+:\d+ http=(\S+):(\d+)$")
MLLP_READY_RE = re.compile(r"^isthmus listening mllp=(\S+):(\d+) http=\S+:\d+$")
FAKE_READY_RE = re.compile(r"^isthmus-fake-ehr listening http=(\S+):(\d+)$")

ADT_TEMPLATE = REPO_ROOT / "tests" / "messages" / "adt_a01.hl7"
READ_IDS = 1000  # distinct ids the reads cycle over (the fake answers any id)

TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 3.0
TARGET_DRAIN_RATE = 2_000.0

# The fake backend's answers: one synthetic Patient (invented data), the id spliced in.
_PATIENT_HEAD = b'{"resourceType":"Patient","id":"'
_PATIENT_TAIL = (
    b'","meta":{"versionId":"1","lastUpdated":"2026-11-26T12:00:00.000Z"},'
    b'"identifier":[{"system":"urn:oid:2.999.1","value":"BENCH1"}],'
    b'"name":[{"use":"official","family":"Doe","given":["Jane"]}],"gender":"female",'
    b'"birthDate":"1980-01-02","telecom":[{"system":"phone","value":"555-0100","use":"home"}]}'
)
_TX_RESPONSE = b'{"resourceType":"Bundle","type":"transaction-response","entry":[]}'
_LAST_MODIFIED = "Thu, 26 Nov 2026 12:00:00 GMT"


# --------------------------------------------------------------------------- fake backend


async def serve_fake(host: str, port: int) -> None:
    """The fake FHIR backend: as little work per request as aiohttp allows."""
    from aiohttp import web

    seen: set[str] = set()
    state = {"transactions": 0, "first": 0.0, "last": 0.0}
    read_headers = {"ETag": 'W/"1"', "Last-Modified": _LAST_MODIFIED}

    async def read(request: web.Request) -> web.Response:
        body = _PATIENT_HEAD + request.match_info["id"].encode() + _PATIENT_TAIL
        return web.Response(body=body, headers=read_headers, content_type=FHIR_JSON)

    async def transaction(request: web.Request) -> web.Response:
        await request.read()
        now = time.monotonic()
        if not state["transactions"]:
            state["first"] = now
        state["transactions"] += 1
        state["last"] = now
        seen.add(request.headers.get("X-Request-Id", ""))
        return web.Response(body=_TX_RESPONSE, content_type=FHIR_JSON)

    async def count(request: web.Request) -> web.Response:
        return web.json_response({**state, "distinct": len(seen)})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_get(r"/fhir/Patient/{id:[A-Za-z0-9\-.]{1,64}}", read)
    app.router.add_post("/fhir", transaction)
    app.router.add_post("/fhir/", transaction)
    app.router.add_get("/count", count)
    await serve_until_signal(app, host, port, "isthmus-fake-ehr")


def fake_argv(port: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--fake-backend",
            "--port", str(port)]


def fake_count(host: str, port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/count")
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise BenchError(f"fake backend: GET /count answered {response.status}")
        value: dict[str, Any] = json.loads(data)
        return value
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"fake backend: GET /count failed: {exc!r}") from None
    finally:
        conn.close()


# --------------------------------------------------------------------------- gateway


def gateway_config(key: str, backend_port: int, synchronous: str,
                   concurrency: int | None) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()
    lines = [
        "[fhir]",
        'audit_reads = "off"',
        "",
        "[store]",
        f'synchronous = "{synchronous}"',
        "",
        "[[auth.api_keys]]",
        'name = "bench"',
        f'key_sha256 = "{digest}"',
        'scopes = ["system/*.cruds"]',
        "",
        "[[backends]]",
        'name = "ehr"',
        'kind = "fhir"',
        f'base_url = "http://127.0.0.1:{backend_port}/fhir"',
        "cache_ttl = 0",
        "backoff_base = 0.02",
        "retry_max_delay = 0.2",
        "breaker_reset = 0.2",
        "max_attempts = 1000",
    ]
    if concurrency is not None:
        lines.append(f"max_concurrency = {concurrency}")
    lines += [
        "",
        "[[routes]]",
        'match = { resource = "Patient" }',
        'to = ["ehr"]',
        "",
        "[[routes]]",
        'match = { message = "ADT^*" }',
        'to = ["ehr"]',
    ]
    return "\n".join(lines) + "\n"


def gateway_argv(config: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "gateway", "--config", str(config), "serve",
            "--host", "127.0.0.1", "--mllp-port", "0", "--http-port", "0",
            "--data-dir", str(data_dir)]


def write_gateway(run_dir: Path, key: str, backend_port: int,
                  args: argparse.Namespace) -> tuple[Path, Path]:
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True, mode=0o700)
    config = run_dir / "isthmus.toml"
    config.write_text(gateway_config(key, backend_port, args.synchronous,
                                     args.backend_concurrency))
    return config, data_dir


def free_port() -> int:
    """A loopback port nothing listens on now (the backend that is down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- facade


@dataclass
class FacadeRow:
    path: str  # "direct" | "gateway"
    result: PhaseResult
    fake_cpu: float | None

    @property
    def other_load(self) -> float | None:
        """Cores used meanwhile by everything but the client, gateway and fake processes
        (other work on the machine disturbs the figures); None without /proc."""
        r = self.result
        if r.machine_cpu is None or r.server_cpu is None or r.seconds <= 0:
            return None
        busy = r.client_cpu + r.server_cpu
        if self.path == "gateway":
            busy += self.fake_cpu or 0.0
        return max(0.0, r.machine_cpu - busy) / r.seconds


def get_once(host: str, port: int, path: str, key: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", path, headers={"X-API-Key": key, "Accept": FHIR_JSON})
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"GET {path} failed: {exc!r}") from None
    finally:
        conn.close()


def measure(path: str, target: Target, connections: int, seconds: float,
            fake_pid: int | None, args: argparse.Namespace) -> FacadeRow:
    before = process_cpu_seconds(fake_pid)
    result = run_phase(path, target, connections, 1, seconds, args)
    after = process_cpu_seconds(fake_pid)
    if path == "direct":  # the fake is the server measured over the phase itself
        return FacadeRow(path, result, result.server_cpu)
    fake_cpu = after - before if before is not None and after is not None else None
    return FacadeRow(path, result, fake_cpu)


def bench_facade(args: argparse.Namespace, workdir: Path, key: str) -> list[FacadeRow]:
    run_dir = workdir / "facade"
    run_dir.mkdir()
    fake = ServerProcess("fake-ehr-facade", fake_argv(0), FAKE_READY_RE, run_dir)
    rows: list[FacadeRow] = []
    with started(fake, args.startup_timeout) as (fhost, fport):
        config, data_dir = write_gateway(run_dir, key, fport, args)
        gateway = ServerProcess("gateway-facade", gateway_argv(config, data_dir),
                                HTTP_READY_RE, run_dir)
        with started(gateway, args.startup_timeout) as (ghost, gport):
            print(f"\nfacade: fake backend (pid {fake.pid}) at {fhost}:{fport}, gateway "
                  f"(pid {gateway.pid}) at {ghost}:{gport} proxying Patient to it "
                  f"(cache_ttl = 0)", flush=True)
            ids = [f"bench-{n}" for n in range(1, READ_IDS + 1)]
            status, body = get_once(ghost, gport, f"/fhir/Patient/{ids[0]}", key)
            if status != 200 or READ_EXPECT not in body or ids[0].encode() not in body:
                raise BenchError(f"GET /fhir/Patient/<id> through the gateway answered "
                                 f"{status}: {body[:300]!r}")
            direct = Target(fhost, fport, [build_request(fhost, fport, f"/fhir/Patient/{i}",
                                                         key) for i in ids],
                            READ_EXPECT, fake.pid)
            via = Target(ghost, gport, [build_request(ghost, gport, f"/fhir/Patient/{i}",
                                                      key) for i in ids],
                         READ_EXPECT, gateway.pid)
            if args.warmup > 0:
                for name, target in (("direct", direct), ("gateway", via)):
                    warm = run_phase(name, target, 8, 1, args.warmup, args)
                    print(f"warm-up {name}: {warm.requests} requests in {warm.seconds:.1f} s"
                          f" on 8 connections, {warm.errors} errors", flush=True)
            print(FACADE_HEADER, flush=True)
            for connections in args.connections:
                for name, target in (("direct", direct), ("gateway", via)):
                    row = measure(name, target, connections, args.seconds, fake.pid, args)
                    print(format_facade_row(row), flush=True)
                    if (row.other_load or 0.0) > 0.2:
                        print(f"{'':<9}note: other processes kept {row.other_load:.0%} of a "
                              "core busy during this row; its figures are disturbed",
                              flush=True)
                    rows.append(row)
    return rows


FACADE_HEADER = (f"{'path':<8} {'conns':>5} {'requests':>8} {'req/s':>7} {'p50 ms':>7} "
                 f"{'p99 ms':>7} {'errors':>6} {'gw us/req':>9} {'fake us/req':>11} "
                 f"{'oth cpu':>7}")


def _load(load: float | None) -> str:
    return "-" if load is None else f"{load:.0%}"


def _us(cpu: float | None, count: int) -> str:
    return "-" if cpu is None or not count else f"{cpu / count * 1e6:.0f}"


def format_facade_row(row: FacadeRow) -> str:
    r = row.result
    gw_us = _us(r.server_cpu, r.requests) if row.path == "gateway" else "-"
    return (f"{row.path:<8} {r.connections:>5} {r.requests:>8} {r.rate:>7.0f} "
            f"{r.percentile_ms(50):>7.2f} {r.percentile_ms(99):>7.2f} {r.errors:>6} "
            f"{gw_us:>9} {_us(row.fake_cpu, r.requests):>11} {_load(row.other_load):>7}")


def added(rows: Sequence[FacadeRow], connections: int) -> tuple[float, float] | None:
    """(p50, p99) of the gateway minus those of the direct path, in ms."""
    found = {row.path: row.result for row in rows if row.result.connections == connections}
    if "direct" not in found or "gateway" not in found:
        return None
    gw, direct = found["gateway"], found["direct"]
    return (gw.percentile_ms(50) - direct.percentile_ms(50),
            gw.percentile_ms(99) - direct.percentile_ms(99))


def facade_summary(rows: Sequence[FacadeRow]) -> list[str]:
    lines = ["", "facade: GET /fhir/Patient/{id} through the gateway vs directly to the "
             "fake backend", FACADE_HEADER]
    lines += [format_facade_row(row) for row in rows]
    for connections in sorted({row.result.connections for row in rows}):
        delta = added(rows, connections)
        if delta is not None:
            lines.append(f"added by the gateway at {connections} conn: "
                         f"p50 {delta[0]:+.2f} ms, p99 {delta[1]:+.2f} ms")
    target = (f"target: added p50 <= {TARGET_ADDED_P50_MS:g} ms, "
              f"p99 <= {TARGET_ADDED_P99_MS:g} ms (1 connection)")
    delta = added(rows, 1)
    if delta is None:
        lines.append(f"{target}: n/a (1 connection not measured)")
    else:
        ok = delta[0] <= TARGET_ADDED_P50_MS and delta[1] <= TARGET_ADDED_P99_MS
        lines.append(f"{target}: {'PASS' if ok else 'MISS'}")
    return lines


# --------------------------------------------------------------------------- drain


def adt_messages(count: int, patients: int, run_tag: str) -> list[list[tuple[bytes, bytes]]]:
    """Framed ADT^A01s (frame, control id), message n for patient n % patients; per
    patient in sequence order. Returned per patient."""
    raw = ADT_TEMPLATE.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    raw = raw.rstrip(b"\r") + b"\r"
    if b"MRN-100001" not in raw or b"CTRL-ADT-0001" not in raw:
        raise BenchError(f"{ADT_TEMPLATE} lacks MRN-100001 or CTRL-ADT-0001")
    lanes: list[list[tuple[bytes, bytes]]] = [[] for _ in range(patients)]
    for n in range(count):
        patient = n % patients
        ctrl = f"BF{run_tag}{n:08d}".encode()  # <= 20 characters
        text = raw.replace(b"MRN-100001", f"MRN-{patient + 200000:06d}".encode())
        text = text.replace(b"CTRL-ADT-0001", ctrl)
        lanes[patient].append((START_BLOCK + text + END_BLOCK, ctrl))
    return lanes


async def send_lane(host: str, port: int, frames: Sequence[tuple[bytes, bytes]],
                    window: int, timeout: float) -> list[str]:
    """Send frames over one connection, `window` in flight; a problem per bad ACK."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    problems: list[str] = []
    try:
        for start in range(0, len(frames), window):
            chunk = frames[start:start + window]
            writer.write(b"".join(frame for frame, _ in chunk))
            await writer.drain()
            for _, ctrl in chunk:
                reply = await asyncio.wait_for(reader.readuntil(END_BLOCK), timeout)
                code, acked = parse_msa(reply.lstrip(START_BLOCK))
                if code != b"AA" or acked != ctrl:
                    problems.append(f"{code.decode(errors='replace')} for "
                                    f"{acked.decode(errors='replace')}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return problems


async def ingest(host: str, port: int, lanes: Sequence[Sequence[tuple[bytes, bytes]]],
                 window: int, timeout: float) -> list[str]:
    results = await asyncio.gather(*(send_lane(host, port, lane, window, timeout)
                                     for lane in lanes))
    return [problem for part in results for problem in part]


def pending_rows(db: Path) -> int:
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT count(*) FROM outbox WHERE status = 'pending'").fetchone()
        return int(row[0])
    finally:
        conn.close()


@dataclass
class DrainResult:
    messages: int
    connections: int
    window: int
    ingest_seconds: float
    ingest_gw_cpu: float | None
    pending_after_ingest: int
    to_first: float  # backend up -> first transaction received
    first_to_last: float  # first -> last transaction received
    to_last: float  # backend up -> last transaction received
    to_empty: float  # backend up -> no pending row
    received: int
    distinct: int
    gw_cpu: float | None
    fake_cpu: float | None
    ingest_other: float | None  # cores used by other processes meanwhile
    drain_other: float | None

    @property
    def ingest_rate(self) -> float:
        return self.messages / self.ingest_seconds

    @property
    def rate(self) -> float:
        """Deliveries/s from the first to the last delivery (the steady drain)."""
        return (self.received - 1) / self.first_to_last if self.first_to_last > 0 else 0.0

    @property
    def overall_rate(self) -> float:
        return self.received / self.to_last if self.to_last > 0 else 0.0


def bench_drain(args: argparse.Namespace, workdir: Path, key: str) -> DrainResult:
    run_dir = workdir / "drain"
    run_dir.mkdir()
    port = free_port()
    config, data_dir = write_gateway(run_dir, key, port, args)
    gateway = ServerProcess("gateway-drain", gateway_argv(config, data_dir), MLLP_READY_RE,
                            run_dir)
    total = args.messages
    lanes = adt_messages(total, args.patients, secrets.token_hex(3).upper())
    connections = min(args.mllp_connections, args.patients)
    # A patient's messages go over one connection, in order, interleaved with those of
    # the connection's other patients by sequence number.
    per_connection = [
        [item for group in round_robin([lanes[p] for p in range(c, args.patients,
                                                                 connections)])
         for item in group]
        for c in range(connections)]
    with started(gateway, args.startup_timeout) as (mhost, mport):
        print(f"\ndrain: gateway (pid {gateway.pid}) mllp at {mhost}:{mport}, backend "
              f"'ehr' at 127.0.0.1:{port} is down; synchronous = {args.synchronous}",
              flush=True)
        cpu0 = process_cpu_seconds(gateway.pid)
        machine0, own0 = machine_cpu_seconds(), time.process_time()
        begin = time.perf_counter()
        problems = asyncio.run(ingest(mhost, mport, per_connection, args.window,
                                      args.ack_timeout))
        ingest_seconds = time.perf_counter() - begin
        cpu1 = process_cpu_seconds(gateway.pid)
        ingest_other = other_cores(machine0, machine_cpu_seconds(), ingest_seconds,
                                   diff(cpu0, cpu1), time.process_time() - own0)
        if problems:
            raise BenchError(f"{len(problems)} of {total} messages not ACKed AA "
                             f"(first: {problems[0]})")
        db = data_dir / "inbox.db"
        pending = pending_rows(db)
        print(f"ingest: {total} ADT^A01 for {args.patients} patients over {connections} "
              f"connections (window {args.window}) in {ingest_seconds:.2f} s, "
              f"{total / ingest_seconds:.0f} msg/s, all AA; outbox pending {pending}",
              flush=True)
        if pending != total:
            raise BenchError(f"the outbox holds {pending} pending rows, expected {total}")
        fake = ServerProcess("fake-ehr-drain", fake_argv(port), FAKE_READY_RE, run_dir)
        with started(fake, args.startup_timeout) as (fhost, fport):
            up = time.monotonic()
            gw_cpu0 = process_cpu_seconds(gateway.pid)
            fake_cpu0 = process_cpu_seconds(fake.pid)
            machine0, own0 = machine_cpu_seconds(), time.process_time()
            print(f"drain: fake backend (pid {fake.pid}) up at {fhost}:{fport}", flush=True)
            deadline = up + args.drain_timeout
            next_check = up + 0.5
            while True:
                state = fake_count(fhost, fport)
                now = time.monotonic()
                if state["distinct"] >= total or now >= next_check:
                    left = pending_rows(db)
                    next_check = now + 0.5
                    if left == 0:
                        empty_at = time.monotonic()
                        # Every delivered row was counted by the fake before it answered.
                        state = fake_count(fhost, fport)
                        if state["distinct"] >= total:
                            break
                        raise BenchError(
                            f"nothing pending, but only {state['distinct']} of {total} "
                            "delivered (dead-lettered? see `isthmus outbox list`)")
                if now > deadline:
                    raise BenchError(
                        f"not drained within {args.drain_timeout:g} s: {state['distinct']} "
                        f"of {total} received, {pending_rows(db)} pending")
                time.sleep(0.01)
            gw_cpu1 = process_cpu_seconds(gateway.pid)
            fake_cpu1 = process_cpu_seconds(fake.pid)
            drain_other = other_cores(machine0, machine_cpu_seconds(), empty_at - up,
                                      diff(gw_cpu0, gw_cpu1), diff(fake_cpu0, fake_cpu1),
                                      time.process_time() - own0)
            state = fake_count(fhost, fport)

    return DrainResult(
        messages=total, connections=connections, window=args.window,
        ingest_seconds=ingest_seconds, ingest_gw_cpu=diff(cpu0, cpu1),
        pending_after_ingest=pending, to_first=state["first"] - up,
        first_to_last=state["last"] - state["first"], to_last=state["last"] - up,
        to_empty=empty_at - up, received=state["transactions"],
        distinct=state["distinct"], gw_cpu=diff(gw_cpu0, gw_cpu1),
        fake_cpu=diff(fake_cpu0, fake_cpu1), ingest_other=ingest_other,
        drain_other=drain_other)


def diff(a: float | None, b: float | None) -> float | None:
    return b - a if a is not None and b is not None else None


def other_cores(machine0: float | None, machine1: float | None, seconds: float,
                *ours: float | None) -> float | None:
    """Cores used by processes other than ours (given) over ``seconds``, from /proc/stat."""
    if machine0 is None or machine1 is None or seconds <= 0 or None in ours:
        return None
    return max(0.0, machine1 - machine0 - sum(x for x in ours if x is not None)) / seconds


def round_robin(groups: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Round-robin over groups: [[g0[0], g1[0], ...], [g0[1], g1[1], ...], ...]."""
    longest = max((len(g) for g in groups), default=0)
    return [[g[i] for g in groups if i < len(g)] for i in range(longest)]


def drain_summary(d: DrainResult) -> list[str]:
    lines = ["", f"outbox drain: {d.messages} ADT^A01 queued while the backend was down, "
             "then delivered to the fake backend"]
    lines.append(f"ingest (backend down)  {d.messages:>6} msgs  {d.ingest_seconds:>6.2f} s "
                 f"{d.ingest_rate:>7.0f} msg/s  ({d.connections} conns, window {d.window}; "
                 f"gateway {_us(d.ingest_gw_cpu, d.messages)} us CPU/msg; all AA, "
                 f"{d.pending_after_ingest} pending)")
    lines.append(f"backend up -> 1st delivery            {d.to_first:>6.2f} s")
    lines.append(f"1st -> last delivery   {d.received:>6} txs  {d.first_to_last:>6.2f} s "
                 f"{d.rate:>7.0f} deliveries/s")
    lines.append(f"backend up -> last     {d.received:>6} txs  {d.to_last:>6.2f} s "
                 f"{d.overall_rate:>7.0f} deliveries/s (overall)")
    lines.append(f"backend up -> 0 pending                {d.to_empty:>6.2f} s")
    lines.append(f"received {d.received}, distinct request ids {d.distinct}, duplicates "
                 f"{d.received - d.distinct}; CPU per delivery: gateway "
                 f"{_us(d.gw_cpu, d.received)} us, fake {_us(d.fake_cpu, d.received)} us")
    lines.append(f"other processes' CPU (not this bench's): {_load(d.ingest_other)} of a core "
                 f"during the ingest, {_load(d.drain_other)} during the drain")
    ok = d.rate >= TARGET_DRAIN_RATE
    lines.append(f"target: >= {TARGET_DRAIN_RATE:,.0f} deliveries/s to a fast backend "
                 f"(1st -> last delivery): {'PASS' if ok else 'MISS'}")
    return lines


# --------------------------------------------------------------------------- driver


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Forwarding benchmark: facade latency added by the gateway, outbox "
                    "drain rate.")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="measured seconds per facade row (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="warm-up seconds per facade path, on 8 connections (default 1)")
    parser.add_argument("--connections", type=parse_connections, default=[1, 8],
                        help="facade connection counts (default 1,8)")
    parser.add_argument("--messages", type=int, default=5000,
                        help="ADT^A01 messages queued and drained (default 5000)")
    parser.add_argument("--patients", type=int, default=100,
                        help="patients the messages are for (default 100)")
    parser.add_argument("--mllp-connections", type=int, default=4,
                        help="MLLP connections for the ingest (default 4)")
    parser.add_argument("--window", type=int, default=32,
                        help="MLLP frames in flight per connection (default 32)")
    parser.add_argument("--synchronous", choices=("normal", "full", "extra"), default="full",
                        help="[store] synchronous for the gateways (default full)")
    parser.add_argument("--backend-concurrency", type=int, default=None,
                        help="the backend's max_concurrency (default: the gateway's, 8)")
    parser.add_argument("--facade-only", action="store_true", help="skip the drain")
    parser.add_argument("--drain-only", action="store_true", help="skip the facade")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--ack-timeout", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="fail if any single facade answer takes longer (seconds)")
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temp dir (configs, logs, the gateways' data)")
    parser.add_argument("--fake-backend", action="store_true",
                        help="run only the fake FHIR backend until SIGTERM")
    parser.add_argument("--host", default="127.0.0.1", help="--fake-backend: address")
    parser.add_argument("--port", type=int, default=0, help="--fake-backend: port")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be > 0 and --warmup >= 0")
    if args.messages < 1 or args.patients < 1 or args.mllp_connections < 1 or args.window < 1:
        parser.error("--messages, --patients, --mllp-connections, --window must be >= 1")
    if args.facade_only and args.drain_only:
        parser.error("--facade-only and --drain-only exclude each other")
    return args


def run(args: argparse.Namespace) -> int:
    key = "bench-" + secrets.token_urlsafe(24)
    workdir = Path(tempfile.mkdtemp(prefix="isthmus-bench-forward-"))
    print(f"forward bench: {os.cpu_count()} cores; facade {args.seconds:g} s per row at "
          f"{','.join(map(str, args.connections))} connections; drain {args.messages} "
          f"messages, synchronous = {args.synchronous}", flush=True)
    facade: list[FacadeRow] = []
    drain: DrainResult | None = None
    try:
        if not args.drain_only:
            facade = bench_facade(args, workdir, key)
        if not args.facade_only:
            drain = bench_drain(args, workdir, key)
    except BenchError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep_tmp:
            print(f"temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if facade:
        print("\n".join(facade_summary(facade)))
    if drain is not None:
        print("\n".join(drain_summary(drain)))
    failed = sum(row.result.errors for row in facade)
    if failed:
        print(f"\nerror: {failed} facade requests were answered with an error",
              file=sys.stderr)
        return 1
    if drain is not None and drain.received != drain.distinct:
        print(f"\nerror: {drain.received - drain.distinct} transactions arrived twice",
              file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fake_backend:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_fake(args.host, args.port))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
