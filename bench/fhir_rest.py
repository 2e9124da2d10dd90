"""FHIR REST read and search benchmark for the Isthmus gateway (a benchmark, not a test).

What is measured
----------------
Throughput and latency of two FHIR R4 interactions on the gateway's HTTP port, for a fixed
time (``--seconds``, default 5) at each connection count (default 1, 8 and 64):

1. read by id: ``GET /fhir/Patient/<id>``, cycling over ``--patients`` (default 1000)
   synthetic Patients loaded beforehand with transaction Bundles POSTed to ``/fhir``
   (``--bundle-size`` entries each, default 100). Every Patient has a unique identifier
   ``urn:oid:2.999.1|BENCH<n>``, a name, birthDate, gender and telecom (invented data).
2. search by identifier: ``GET /fhir/Patient?identifier=urn:oid:2.999.1|BENCH<n>``
   (the ``|`` percent-encoded), cycling over the same Patients.

Every connection is kept alive and works in lock-step: send one pre-built HTTP/1.1
request (Host and ``X-API-Key`` headers), read the whole response (status line and
Content-Length), record the round trip with ``time.perf_counter_ns``, send the next one.
Each connection starts at a different Patient. A response that is not 2xx, or whose body
lacks what the interaction must return (a Patient; a search match), counts as an error.
Reported per row: requests, req/s, p50 and p99 latency, errors, req/s as a ratio of the
ceiling's at the same connection count, and from ``/proc``: the CPU use of the client
processes and of the server process (all its threads), the server's CPU microseconds per
request, and the CPU used by everything else on the machine meanwhile ("oth cpu": other
work on a shared 2-core machine disturbs the figures, and this column shows when).

The gateway is run three times, each time on a fresh data dir, once per
``[fhir] audit_reads`` mode: ``durable`` (the default: every read and search answered
only once its audit record is committed), ``queued`` (answered once the record is queued
for the next group commit) and ``off`` (no read records), so the cost of auditing reads
shows (``--audit durable|queued|off|all``, default all). The gateway
gets an API key with scope ``system/*.cruds`` through a config file written to the temp
dir; ``--synchronous normal`` adds ``[store] synchronous = "normal"`` (default: the
gateway's own default, "full").

In the same run the ceiling is measured: a bare aiohttp server (this script with
``--bare-server``, one process) whose handler answers every read with the bytes of one
Patient as the gateway serves it (fetched from the gateway first), driven by the same
client at the same connection counts with the same requests. A second ceiling, bare
aiohttp plus a sqlite3 ``SELECT`` by primary key on the gateway's own ``fhir.db`` (the
same query its read runs), shows what the store lookup adds (``--no-sqlite-ceiling``
skips it). A short warm-up (``--warmup`` seconds on 8 connections) precedes each
scenario on each server.

The load generator always runs in processes separate from the server under test (a lean
asyncio.Protocol client, not aiohttp's). ``--client-procs`` (default ``auto``: one
process, which drives the bare ceiling at ~24,000 req/s using ~60 % of its core on the
2-core VM) spreads the connections over that many processes; the number used is printed
in every row, and a note when the client processes come near saturation.

How to run
----------
    python bench/fhir_rest.py                           # everything, 5 s per row
    python bench/fhir_rest.py --seconds 3 --connections 1,8
    python bench/fhir_rest.py --audit durable --no-ceiling   # only the default gateway
    python bench/fhir_rest.py --synchronous normal      # [store] synchronous = "normal"
    python bench/fhir_rest.py --ceiling-only            # the bare ceiling, no gateway
    python bench/fhir_rest.py --bare-server --bare-body FILE   # just the bare server
    make bench-fhir

The gateway is started as ``python -m gateway --config FILE serve --host 127.0.0.1
--mllp-port 0 --http-port 0 --data-dir DIR`` (FILE and DIR in a temporary directory); the
script waits for the line ``isthmus listening mllp=HOST:PORT http=HOST:PORT`` on its
stdout, stops it with SIGTERM (SIGKILL after 10 s) and removes the temporary directory at
the end (``--keep-tmp`` keeps it, with the servers' logs).

When the durable mode runs, the disk's sync floor is measured in the same run: 200
``fdatasync`` calls after 4 KiB overwrites of a file in the temp dir (the data dirs' file
system), printed as p50/p99 with what it allows a read that waits for its audit commit:
at most ``connections / p50`` req/s with lock-step connections, p99 at least the sync's.

The target lines ("read >= 8,000 req/s at 8 connections with p99 <= 5 ms", "search by
identifier >= 3,000 req/s", taken at 8 connections; and issue 15's, as shares of the bare
ceiling in the same run: read >= 0.5 with p99 <= 5 ms, search >= 0.35) are
informational: the exit status
is 0 unless something errored (a server failed to start, the preload failed, a
connection failed or stalled, or a measured request was answered with an error), then 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import math
import multiprocessing as mp
import os
import re
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

# bench/ is on sys.path when this file runs as a script (and in the spawned clients).
from mllp_ingest import (
    BenchError,
    ServerProcess,
    collect,
    parse_connections,
    percentile,
    process_cpu_seconds,
    started,
    wait_for_go,
)

GATEWAY_READY_RE = re.compile(r"^isthmus listening mllp=\S+:\d+ http=(\S+):(\d+)$")
BARE_READY_RE = re.compile(r"^isthmus-bare listening http=(\S+):(\d+)$")

IDENTIFIER_SYSTEM = "urn:oid:2.999.1"
FHIR_JSON = "application/fhir+json"
READ_EXPECT = b'"resourceType":"Patient"'
SEARCH_EXPECT = b'"search":{"mode":"match"}'
MAX_HEAD_BYTES = 64 * 1024

TARGET_CONNECTIONS = 8
TARGET_READ_RATE = 8_000.0
TARGET_READ_P99_MS = 5.0
TARGET_SEARCH_RATE = 3_000.0
# Issue 15's targets, as shares of the bare ceiling's rate at TARGET_CONNECTIONS.
TARGET_READ_RATIO = 0.5
TARGET_SEARCH_RATIO = 0.35
SYNC_SAMPLES = 200

# The ceilings' fixed response headers, shaped like the gateway's read answer.
BARE_LAST_MODIFIED = "Thu, 26 Nov 2026 12:00:00 GMT"
BARE_SQL = (
    "SELECT type, id, version, last_updated, deleted, body FROM fhir_resource "
    "WHERE type = ? AND id = ?"
)


# --------------------------------------------------------------------------- synthetic data

_GIVEN = ("Jane", "John", "Maria", "Ahmed", "Li", "Olga", "Kofi", "Ana", "Sven", "Priya")
_FAMILY = ("Doe", "Roe", "Smith", "Garcia", "Chen", "Ivanova", "Mensah", "Silva", "Berg", "Rao")
_GENDERS = ("female", "male", "other", "unknown")


def synthetic_patient(n: int) -> dict[str, Any]:
    """Patient number ``n``: invented data, unique identifier ``urn:oid:2.999.1|BENCH<n>``."""
    return {
        "resourceType": "Patient",
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": f"BENCH{n}"}],
        "name": [{"use": "official", "family": _FAMILY[n % 10],
                  "given": [_GIVEN[(n // 10) % 10]]}],
        "gender": _GENDERS[n % 4],
        "birthDate": f"{1940 + n % 60}-{1 + n % 12:02d}-{1 + n % 28:02d}",
        "telecom": [{"system": "phone", "value": f"555-{n % 10_000:04d}", "use": "home"}],
    }


def transaction_bundle(first: int, count: int) -> bytes:
    """A transaction Bundle creating Patients ``first`` .. ``first + count - 1``."""
    entries = [{"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{n:012d}",
                "resource": synthetic_patient(n),
                "request": {"method": "POST", "url": "Patient"}}
               for n in range(first, first + count)]
    return json.dumps({"resourceType": "Bundle", "type": "transaction",
                       "entry": entries}).encode()


def search_path(n: int) -> str:
    return "/fhir/Patient?identifier=" + quote(f"{IDENTIFIER_SYSTEM}|BENCH{n}", safe=":")


def build_request(host: str, port: int, path: str, key: str) -> bytes:
    """One pre-built keep-alive HTTP/1.1 GET."""
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nX-API-Key: {key}\r\n"
            f"Accept: {FHIR_JSON}\r\n\r\n").encode("ascii")


# --------------------------------------------------------------------------- setup requests


def _http(host: str, port: int, method: str, path: str, key: str,
          body: bytes | None = None, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """One blocking request (preload and fetch only; never measured)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"X-API-Key": key, "Accept": FHIR_JSON}
        if body is not None:
            headers["Content-Type"] = FHIR_JSON
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"{method} {path.split('?')[0]} failed: {exc!r}") from None
    finally:
        conn.close()


def preload(host: str, port: int, key: str, patients: int, bundle_size: int) -> list[str]:
    """POST the synthetic Patients in transaction Bundles; their ids, in Patient order."""
    ids: list[str] = []
    for first in range(1, patients + 1, bundle_size):
        count = min(bundle_size, patients + 1 - first)
        status, _, data = _http(host, port, "POST", "/fhir", key,
                                transaction_bundle(first, count))
        if status != 200:
            raise BenchError(f"preload: POST /fhir answered {status}: {data[:400]!r}")
        try:
            entries = json.loads(data)["entry"]
            for entry in entries:
                response = entry["response"]
                if not str(response["status"]).startswith("201"):
                    raise BenchError(f"preload: an entry answered {response['status']}")
                ids.append(str(response["location"]).split("/")[1])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise BenchError(f"preload: unexpected transaction-response ({exc!r})") from None
        if len(entries) != count:
            raise BenchError(f"preload: {len(entries)} entries answered, {count} sent")
    return ids


def fetch_patient(host: str, port: int, key: str, id_: str) -> bytes:
    """The bytes the gateway serves for one read (what the bare ceiling answers with)."""
    status, headers, data = _http(host, port, "GET", f"/fhir/Patient/{id_}", key)
    if status != 200 or READ_EXPECT not in data:
        raise BenchError(f"GET /fhir/Patient/<id> answered {status}: {data[:400]!r}")
    if "content-length" not in headers:
        raise BenchError("the gateway's read answer has no Content-Length")
    return data


def check_search(host: str, port: int, key: str, n: int, id_: str) -> None:
    status, _, data = _http(host, port, "GET", search_path(n), key)
    if status != 200 or id_.encode() not in data or data.count(b'"fullUrl"') != 1:
        raise BenchError(f"search by identifier answered {status}: {data[:400]!r}")


# --------------------------------------------------------------------------- client


class LockstepHttp(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request outstanding, until the deadline."""

    def __init__(self, requests: Sequence[bytes], first: int, expect: bytes) -> None:
        self._requests = requests
        self._next = first % len(requests)
        self._expect = expect
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._need = -1  # body bytes still expected; -1: reading a status line and headers
        self._status = 0
        self._closing = False
        self.deadline_ns = 0  # perf_counter_ns: no new request is sent at or after it
        self.sent_ns = 0
        self.end_ns = 0  # monotonic_ns of the last answer
        self.latencies = array("q")
        self.statuses: Counter[int] = Counter()
        self.bad_bodies = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def start(self, deadline_ns: int) -> None:
        self.deadline_ns = deadline_ns
        self._send_next()

    def _send_next(self) -> None:
        assert self._transport is not None
        request = self._requests[self._next]
        self._next += 1
        if self._next == len(self._requests):
            self._next = 0
        self.sent_ns = time.perf_counter_ns()
        self._transport.write(request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        buf = self._buffer
        buf += data
        while not self.done.done():
            if self._need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        self._finish(BenchError("response headers too large"))
                    return
                error = self._read_head(bytes(buf[:end]))
                del buf[: end + 4]
                if error is not None:
                    self._finish(BenchError(error))
                    return
            need = self._need
            if len(buf) < need:
                return
            good = 200 <= self._status < 300
            if good and self._expect and buf.find(self._expect, 0, need) < 0:
                good = False
                self.bad_bodies += 1
            del buf[:need]
            self._need = -1
            self._on_response(good, now)
            if not buf:
                return

    def _read_head(self, head: bytes) -> str | None:
        """Status and body length from the head; the reason when it cannot be used."""
        if not head.startswith(b"HTTP/1."):
            return f"not an HTTP/1.x response: {head[:40]!r}"
        try:
            self._status = int(head[9:12])
        except ValueError:
            return f"bad status line: {head[:40]!r}"
        lower = head.lower()
        if b"\r\ntransfer-encoding:" in lower:
            return "chunked (or otherwise encoded) responses are not supported by this client"
        at = lower.find(b"\r\ncontent-length:")
        if at < 0:
            if self._status in (204, 304) or self._status < 200:
                self._need = 0
                return None
            return f"a {self._status} response without Content-Length"
        stop = lower.find(b"\r\n", at + 2)
        try:
            self._need = int(lower[at + 17 : stop if stop >= 0 else len(lower)])
        except ValueError:
            return "bad Content-Length"
        self._closing = b"\r\nconnection: close" in lower
        return None

    def _on_response(self, good: bool, now: int) -> None:
        if self.sent_ns == 0:
            self._finish(BenchError("unsolicited response with no request outstanding"))
            return
        self.latencies.append(now - self.sent_ns)
        self.sent_ns = 0
        self.statuses[self._status] += 1
        if self._closing:
            self._finish(BenchError(f"the server closed the keep-alive connection "
                                    f"(Connection: close on a {self._status})"))
        elif now >= self.deadline_ns:
            self.end_ns = time.monotonic_ns()
            self._finish(None)
        else:
            self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc!r}" if exc else " by peer"
        self._finish(BenchError(f"connection closed{reason} before the end of the phase"))

    def _finish(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


@dataclass
class ClientJob:
    """One client process's share of a phase: the requests and each connection's start."""

    host: str
    port: int
    requests: list[bytes]
    firsts: list[int]
    expect: bytes
    seconds: float
    timeout: float
    connect_timeout: float


@dataclass
class WorkerResult:
    """What one client process measured."""

    start_ns: int
    end_ns: int
    cpu_seconds: float
    latencies: array[int]
    statuses: Counter[int]
    bad_bodies: int


async def open_clients(job: ClientJob) -> list[LockstepHttp]:
    loop = asyncio.get_running_loop()
    clients: list[LockstepHttp] = []
    for first in job.firsts:

        def factory(first: int = first) -> LockstepHttp:
            return LockstepHttp(job.requests, first, job.expect)

        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(factory, job.host, job.port), job.connect_timeout)
        except (OSError, TimeoutError) as exc:
            for client in clients:
                client.close()
            raise BenchError(f"cannot connect to {job.host}:{job.port}: {exc!r}") from exc
        clients.append(proto)
    return clients


async def supervise(clients: Sequence[LockstepHttp], timeout: float) -> None:
    """Wait for all clients; fail on the first error or on an answer slower than timeout."""
    pending = {client.done for client in clients}
    limit_ns = int(timeout * 1e9)
    while pending:
        finished, pending = await asyncio.wait(
            pending, timeout=0.5, return_when=asyncio.FIRST_EXCEPTION)
        for fut in finished:
            fut.result()
        now = time.perf_counter_ns()
        for client in clients:
            if client.sent_ns and now - client.sent_ns > limit_ns:
                raise BenchError(f"no answer within {timeout:g} s")


async def run_job(job: ClientJob, ready: Any, go: Any) -> WorkerResult:
    clients = await open_clients(job)
    try:
        ready()
        wait_for_go(go)  # deliberately blocking: nothing else runs in this loop yet
        start_ns = time.monotonic_ns()
        start_cpu = time.process_time()
        deadline = time.perf_counter_ns() + int(job.seconds * 1e9)
        for client in clients:
            client.start(deadline)
        await supervise(clients, job.timeout)
        cpu_seconds = time.process_time() - start_cpu
    finally:
        for client in clients:
            client.close()
    latencies: array[int] = array("q")
    statuses: Counter[int] = Counter()
    for client in clients:
        latencies.extend(client.latencies)
        statuses.update(client.statuses)
    return WorkerResult(start_ns, max(c.end_ns for c in clients), cpu_seconds, latencies,
                        statuses, sum(c.bad_bodies for c in clients))


def client_worker(index: int, job: ClientJob, results: Any, go: Any) -> None:
    """Entry point of one client process; reports ("ready"|"done"|"error", index, payload)."""
    try:
        result = asyncio.run(run_job(job, lambda: results.put(("ready", index, None)), go))
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    results.put(("done", index, result))


# --------------------------------------------------------------------------- phases


@dataclass
class PhaseResult:
    """One scenario at one connection count against one server."""

    scenario: str
    connections: int
    procs: int
    seconds: float
    latencies: array[int]  # round trips in ns, sorted ascending
    statuses: Counter[int]
    bad_bodies: int = 0
    client_cpu: float = 0.0
    server_cpu: float | None = None
    machine_cpu: float | None = None  # busy CPU seconds of the whole machine

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> int:
        """Non-2xx answers plus 2xx answers without the expected content."""
        return self.bad_bodies + sum(n for s, n in self.statuses.items() if not 200 <= s < 300)

    @property
    def client_load(self) -> float:
        """Mean busy fraction of one client process core over the measured window."""
        return self.client_cpu / (self.seconds * self.procs) if self.seconds > 0 else 0.0

    @property
    def server_load(self) -> float | None:
        """Cores used by the server process (all its threads; local servers only)."""
        if self.server_cpu is None or self.seconds <= 0:
            return None
        return self.server_cpu / self.seconds

    @property
    def server_us(self) -> float | None:
        """Server CPU microseconds per request: less disturbed by other work than req/s."""
        if self.server_cpu is None or not self.requests:
            return None
        return self.server_cpu / self.requests * 1e6

    @property
    def other_load(self) -> float | None:
        """Cores used by everything but the client and server processes (other work on
        the machine disturbs the figures); None where /proc is not available."""
        if self.machine_cpu is None or self.server_cpu is None or self.seconds <= 0:
            return None
        return max(0.0, self.machine_cpu - self.server_cpu - self.client_cpu) / self.seconds

    def percentile_ms(self, pct: float) -> float:
        return percentile(self.latencies, pct) / 1e6


def machine_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine ran since boot (user, nice and system time
    from /proc/stat; not interrupt time, where loopback TCP is partly accounted), or None
    where unavailable."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(f) for f in stat.readline().split()[1:4]]
    except (OSError, ValueError):
        return None
    return sum(fields) / os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    """Where one phase sends what."""

    host: str
    port: int
    requests: list[bytes]
    expect: bytes
    server_pid: int | None


def run_phase(scenario: str, target: Target, connections: int, procs: int, seconds: float,
              args: argparse.Namespace) -> PhaseResult:
    """Drive ``connections`` lock-step connections from ``procs`` client processes."""
    procs = max(1, min(procs, connections))
    size = len(target.requests)
    firsts = [c * size // connections for c in range(connections)]
    jobs = [ClientJob(target.host, target.port, target.requests, firsts[i::procs],
                      target.expect, seconds, args.timeout, 10.0) for i in range(procs)]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    go = ctx.Event()
    workers = [ctx.Process(target=client_worker, args=(i, job, results, go), daemon=True)
               for i, job in enumerate(jobs)]
    for worker in workers:
        worker.start()
    try:
        collect(results, workers, "ready", 10.0 * connections + 60.0)
        machine_before = machine_cpu_seconds()
        cpu_before = process_cpu_seconds(target.server_pid)
        go.set()
        done = collect(results, workers, "done", seconds + args.timeout + 60.0)
        cpu_after = process_cpu_seconds(target.server_pid)
        machine_after = machine_cpu_seconds()
    finally:
        go.set()
        for worker in workers:
            worker.join(5.0)
            if worker.is_alive():
                worker.kill()
                worker.join()
    latencies: array[int] = array("q")
    statuses: Counter[int] = Counter()
    for part in done:
        latencies.extend(part.latencies)
        statuses.update(part.statuses)
    result = PhaseResult(
        scenario=scenario, connections=connections, procs=procs,
        seconds=(max(p.end_ns for p in done) - min(p.start_ns for p in done)) / 1e9,
        latencies=array("q", sorted(latencies)), statuses=statuses,
        bad_bodies=sum(p.bad_bodies for p in done),
        client_cpu=sum(p.cpu_seconds for p in done))
    if cpu_before is not None and cpu_after is not None:
        result.server_cpu = cpu_after - cpu_before
    if machine_before is not None and machine_after is not None:
        result.machine_cpu = machine_after - machine_before
    return result


def auto_client_procs(connections: int) -> int:
    """One client process: on the 2-core VM it needs well under one core to outrun the
    one-process servers measured here (see the cli cpu column), and a second client
    process only takes CPU time from the server."""
    return 1


def bench_scenario(scenario: str, target: Target, args: argparse.Namespace
                   ) -> list[PhaseResult]:
    """Warm up, then measure every connection count."""
    if args.warmup > 0:
        warm_conns = min(TARGET_CONNECTIONS, max(args.connections))
        warm = run_phase(scenario, target, warm_conns, 1, args.warmup, args)
        print(f"{scenario}: warm-up {warm.requests} requests in {warm.seconds:.1f} s on "
              f"{warm_conns} connections, {warm.rate:.0f} req/s, {warm.errors} errors",
              flush=True)
    results = []
    for connections in args.connections:
        procs = args.client_procs or auto_client_procs(connections)
        result = run_phase(scenario, target, connections, procs, args.seconds, args)
        report_phase(result)
        results.append(result)
    return results


def sync_floor(directory: Path, samples: int = SYNC_SAMPLES) -> list[float]:
    """Seconds each of `samples` fdatasync calls took after a 4 KiB overwrite of a file in
    `directory`, sorted: what one durable commit (SQLite WAL, synchronous = full) costs at
    least on this disk, measured in the same run as the rows it explains."""
    path = directory / "sync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, bytes(4096 * 64), 0)
        os.fsync(fd)
        took = []
        for n in range(samples):
            os.pwrite(fd, secrets.token_bytes(4096), 4096 * (n % 64))
            begin = time.perf_counter()
            os.fdatasync(fd)
            took.append(time.perf_counter() - begin)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return sorted(took)


def sync_floor_lines(took: Sequence[float], connections: Sequence[int]) -> list[str]:
    """The fdatasync latency and what it allows a durable read: with `c` lock-step
    connections and each answer waiting for a commit, at most c / latency req/s."""
    p50, p99 = took[len(took) // 2], took[min(len(took) - 1, int(len(took) * 0.99))]
    lines = [f"disk sync floor: fdatasync of 4 KiB p50 {p50 * 1e3:.2f} ms, p99 "
             f"{p99 * 1e3:.2f} ms ({len(took)} samples, the data dir's file system)"]
    for c in connections:
        lines.append(f"  a read that waits for its audit commit (durable, synchronous = full)"
                     f" at {c} connections: at most {c / p50:,.0f} req/s (c / p50), "
                     f"p99 >= {p99 * 1e3:.2f} ms")
    return lines


# --------------------------------------------------------------------------- reporting

HEADER = (
    f"{'scenario':<22} {'conns':>5} {'procs':>5} {'requests':>8} {'req/s':>8} "
    f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'ratio':>6} {'cli cpu':>7} {'srv cpu':>7} "
    f"{'srv us':>6} {'oth cpu':>7}"
)


def format_load(load: float | None) -> str:
    return "-" if load is None else f"{load:.0%}"



def format_row(result: PhaseResult, ceiling: float | None = None) -> str:
    ratio = f"{result.rate / ceiling:.2f}" if ceiling else "-"
    return (
        f"{result.scenario:<22} {result.connections:>5} {result.procs:>5} "
        f"{result.requests:>8} {result.rate:>8.0f} {result.percentile_ms(50):>7.2f} "
        f"{result.percentile_ms(99):>7.2f} {result.errors:>6} {ratio:>6} "
        f"{result.client_load:>7.0%} {format_load(result.server_load):>7} "
        f"{'-' if result.server_us is None else format(result.server_us, '.0f'):>6} "
        f"{format_load(result.other_load):>7}"
    )


def report_phase(result: PhaseResult) -> None:
    print(format_row(result), flush=True)
    if result.errors:
        codes = {s: n for s, n in sorted(result.statuses.items()) if not 200 <= s < 300}
        print(f"{'':<23}errors: status codes {codes}, 2xx without the expected content "
              f"{result.bad_bodies}", flush=True)
    if result.client_load > 0.9:
        print(f"{'':<23}note: client processes near saturation, the rate may be "
              "client-bound (try a higher --client-procs)", flush=True)
    other = result.other_load
    if other is not None and other > 0.2:
        print(f"{'':<23}note: other processes kept {other:.0%} of a core busy during this "
              "row; its figures are disturbed", flush=True)


def print_summary(rows: Sequence[PhaseResult], ceiling: Sequence[PhaseResult]) -> None:
    by_conns = {r.connections: r.rate for r in ceiling}
    ratio = ("ratio: req/s / bare aiohttp req/s at the same connections" if ceiling
             else "no ceiling measured")
    print(f"\nsummary ({ratio}; cpu: busy share of each client process's core, cores used "
          "by the server process (all threads) and by everything else on the machine; srv us: "
          "server CPU microseconds per request)")
    print(HEADER)
    for result in rows:
        print(format_row(result, by_conns.get(result.connections)))


def print_audit_cost(label: str, on: Sequence[PhaseResult],
                     off: Sequence[PhaseResult]) -> None:
    """Per scenario and connection count: req/s and p99 with read auditing on and off."""
    off_rows = {(r.scenario.split(" (")[0], r.connections): r for r in off}
    print(f"\ncost of auditing reads ({label} vs audit off)")
    print(f"{'scenario':<8} {'conns':>5} {'req/s on':>9} {'req/s off':>9} {'cost':>6} "
          f"{'p99 on':>9} {'p99 off':>9}")
    for result in on:
        name = result.scenario.split(" (")[0]
        other = off_rows.get((name, result.connections))
        if other is None:
            continue
        cost = 1 - result.rate / other.rate if other.rate else math.nan
        print(f"{name:<8} {result.connections:>5} {result.rate:>9.0f} {other.rate:>9.0f} "
              f"{cost:>6.0%} {result.percentile_ms(99):>6.2f} ms "
              f"{other.percentile_ms(99):>6.2f} ms")
    print("(audit_reads = \"off\" records no reads or searches; \"queued\" answers before "
          "the record is committed, \"durable\" after)")


def target_lines(label: str, rows: Sequence[PhaseResult],
                 ceiling: Sequence[PhaseResult] = ()) -> list[str]:
    def at_target(scenario: str) -> PhaseResult | None:
        found = [r for r in rows if r.scenario.startswith(scenario)
                 and r.connections == TARGET_CONNECTIONS]
        return found[0] if found else None

    lines = []
    read_text = (f"target ({label}): read >= {TARGET_READ_RATE:,.0f} req/s at "
                 f"{TARGET_CONNECTIONS} connections with p99 <= {TARGET_READ_P99_MS:g} ms")
    read = at_target("read")
    if read is None:
        lines.append(f"{read_text}: n/a ({TARGET_CONNECTIONS} connections not measured)")
    else:
        ok = read.rate >= TARGET_READ_RATE and read.percentile_ms(99) <= TARGET_READ_P99_MS
        lines.append(f"{read_text}: {'met' if ok else 'missed'} ({read.rate:,.0f} req/s, "
                     f"p99 {read.percentile_ms(99):.2f} ms)")
    search_text = (f"target ({label}): search by identifier >= {TARGET_SEARCH_RATE:,.0f} "
                   f"req/s (at {TARGET_CONNECTIONS} connections)")
    search = at_target("search")
    if search is None:
        lines.append(f"{search_text}: n/a ({TARGET_CONNECTIONS} connections not measured)")
    else:
        ok = search.rate >= TARGET_SEARCH_RATE
        lines.append(f"{search_text}: {'met' if ok else 'missed'} ({search.rate:,.0f} req/s, "
                     f"p99 {search.percentile_ms(99):.2f} ms)")
    bare = [r.rate for r in ceiling if r.connections == TARGET_CONNECTIONS]
    for name, share, p99 in (("read", TARGET_READ_RATIO, TARGET_READ_P99_MS),
                             ("search", TARGET_SEARCH_RATIO, None)):
        text = (f"target ({label}, issue 15): {name} >= {share:g} of the bare ceiling at "
                f"{TARGET_CONNECTIONS} connections" + (f", p99 <= {p99:g} ms" if p99 else ""))
        row = at_target(name)
        if row is None or not bare or not bare[0]:
            lines.append(f"{text}: n/a (the row or the ceiling was not measured)")
            continue
        ratio = row.rate / bare[0]
        ok = ratio >= share and (p99 is None or row.percentile_ms(99) <= p99)
        lines.append(f"{text}: {'met' if ok else 'missed'} ({ratio:.2f}, p99 "
                     f"{row.percentile_ms(99):.2f} ms)")
    return lines


# --------------------------------------------------------------------------- servers


def gateway_config(key: str, audit_reads: str, synchronous: str | None) -> str:
    """The gateway's TOML: one API key (stored as its SHA-256), audit_reads, synchronous."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    lines = [
        "[[auth.api_keys]]",
        'name = "bench"',
        f'key_sha256 = "{digest}"',
        'scopes = ["system/*.cruds"]',
        "",
        "[fhir]",
        f'audit_reads = "{audit_reads}"',
    ]
    if synchronous is not None:
        lines += ["", "[store]", f'synchronous = "{synchronous}"']
    return "\n".join(lines) + "\n"


def gateway_argv(config: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "gateway", "--config", str(config), "serve",
            "--host", "127.0.0.1", "--mllp-port", "0", "--http-port", "0",
            "--data-dir", str(data_dir)]


def bare_argv(body: Path, db: Path | None) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--bare-server",
            "--bare-body", str(body)]
    return argv + (["--bare-db", str(db)] if db is not None else [])


@dataclass
class GatewayRun:
    label: str
    rows: list[PhaseResult]
    ids: list[str]
    body: bytes
    data_dir: Path


def synthetic_run(patients: int, workdir: Path) -> GatewayRun:
    """Stand-in for a gateway run (--ceiling-only): ids and a Patient shaped like a read."""
    resource = {"resourceType": "Patient", "id": "00000000-0000-4000-8000-000000000001",
                "meta": {"versionId": "1", "lastUpdated": "2026-11-26T12:00:00.000000Z"},
                **{k: v for k, v in synthetic_patient(1).items() if k != "resourceType"}}
    body = json.dumps(resource, separators=(",", ":")).encode()
    ids = [f"00000000-0000-4000-8000-{n:012d}" for n in range(1, patients + 1)]
    return GatewayRun("ceiling only", [], ids, body, workdir)


def bench_gateway(args: argparse.Namespace, workdir: Path, key: str,
                  audit_reads: str) -> GatewayRun:
    label = f"audit {audit_reads}"
    run_dir = workdir / f"gateway-audit-{audit_reads}"
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True, mode=0o700)
    config = run_dir / "isthmus.toml"
    config.write_text(gateway_config(key, audit_reads, args.synchronous))
    gateway = ServerProcess(f"gateway-{label.replace(' ', '-')}",
                            gateway_argv(config, data_dir), GATEWAY_READY_RE, run_dir)
    with started(gateway, args.startup_timeout) as (host, port):
        print(f"\ngateway ({label}): started (pid {gateway.pid}), http at {host}:{port}, "
              f"config {config.name}: audit_reads = {audit_reads}, synchronous "
              f"= {args.synchronous or 'default (full)'}", flush=True)
        begin = time.perf_counter()
        ids = preload(host, port, key, args.patients, args.bundle_size)
        print(f"gateway ({label}): preloaded {len(ids)} Patients in "
              f"{math.ceil(args.patients / args.bundle_size)} transaction Bundles in "
              f"{time.perf_counter() - begin:.2f} s", flush=True)
        body = fetch_patient(host, port, key, ids[0])
        check_search(host, port, key, 1, ids[0])
        reads = Target(host, port, [build_request(host, port, f"/fhir/Patient/{id_}", key)
                                    for id_ in ids], READ_EXPECT, gateway.pid)
        searches = Target(host, port, [build_request(host, port, search_path(n), key)
                                       for n in range(1, len(ids) + 1)],
                          SEARCH_EXPECT, gateway.pid)
        print(HEADER, flush=True)
        rows = bench_scenario(f"read ({label})", reads, args)
        rows += bench_scenario(f"search ({label})", searches, args)
    return GatewayRun(label, rows, ids, body, data_dir)


def bench_ceiling(args: argparse.Namespace, workdir: Path, key: str, run: GatewayRun,
                  with_db: bool) -> list[PhaseResult]:
    body_file = workdir / "patient.json"
    body_file.write_bytes(run.body)
    name = "bare-sqlite" if with_db else "bare"
    db = run.data_dir / "fhir.db" if with_db else None
    server = ServerProcess(name, bare_argv(body_file, db), BARE_READY_RE, workdir)
    scenario = "ceil aiohttp+sqlite" if with_db else "ceil bare aiohttp"
    with started(server, args.startup_timeout) as (host, port):
        what = (f"a sqlite3 SELECT by primary key on {db}" if with_db
                else f"the {len(run.body)} bytes of one Patient")
        print(f"\nceiling: bare aiohttp server (pid {server.pid}) at {host}:{port}, "
              f"answering reads with {what}", flush=True)
        reads = Target(host, port, [build_request(host, port, f"/fhir/Patient/{id_}", key)
                                    for id_ in run.ids], READ_EXPECT, server.pid)
        print(HEADER, flush=True)
        return bench_scenario(scenario, reads, args)


# --------------------------------------------------------------------------- bare server


async def serve_bare(host: str, port: int, body_file: Path | None, db: Path | None) -> None:
    """The ceiling: aiohttp with one route and nothing else (no auth, audit or store).

    Without ``db`` every read is answered with the bytes of ``body_file``; with it, with
    the body found by the same primary-key SELECT the gateway's read runs, on a plain
    sqlite3 connection on the event loop thread (as the gateway's store does).
    """
    from aiohttp import web

    body = body_file.read_bytes() if body_file else b'{"resourceType":"Patient","id":"1"}'
    fixed = {"ETag": 'W/"1"', "Last-Modified": BARE_LAST_MODIFIED}

    async def fixed_read(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=fixed, content_type=FHIR_JSON)

    handler = fixed_read
    conn: sqlite3.Connection | None = None
    if db is not None:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True,
                               isolation_level=None)
        lookup = conn

        async def sqlite_read(request: web.Request) -> web.Response:
            rows = lookup.execute(BARE_SQL, ("Patient", request.match_info["id"])).fetchall()
            if not rows:
                return web.Response(status=404)
            row = rows[0]
            return web.Response(body=row[5], content_type=FHIR_JSON, headers={
                "ETag": f'W/"{row[2]}"', "Last-Modified": BARE_LAST_MODIFIED})

        handler = sqlite_read
    app = web.Application()
    app.router.add_get("/fhir/Patient/{id}", handler)
    try:
        await serve_until_signal(app, host, port, "isthmus-bare")
    finally:
        if conn is not None:
            conn.close()


async def serve_until_signal(app: Any, host: str, port: int, name: str) -> None:
    """Serve an aiohttp app until SIGTERM/SIGINT, after printing `<name> listening
    http=HOST:PORT` (the line the parent process waits for)."""
    from aiohttp import web

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        print(f"{name} listening http={bound_host}:{bound_port}", flush=True)
        await stop
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- driver


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="FHIR REST read/search benchmark: gateway vs. a bare aiohttp ceiling.")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="measured seconds per scenario and connection count")
    parser.add_argument("--connections", type=parse_connections, default=[1, 8, 64],
                        help="comma-separated connection counts (default 1,8,64)")
    parser.add_argument("--patients", type=int, default=1000,
                        help="synthetic Patients preloaded and read (default 1000)")
    parser.add_argument("--bundle-size", type=int, default=100,
                        help="entries per preload transaction Bundle (default 100)")
    parser.add_argument("--audit", choices=("durable", "queued", "off", "all"), default="all",
                        help="run the gateway with [fhir] audit_reads on, off or both "
                             "(default both, to show the cost of auditing reads)")
    parser.add_argument("--synchronous", choices=("normal", "full", "extra"),
                        help="[store] synchronous for the gateway (default: its own, full)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="warm-up seconds per scenario and server (default 1)")
    parser.add_argument("--client-procs", type=int, default=0,
                        help="client processes per row (default 0 = auto: 1)")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip both bare aiohttp ceilings")
    parser.add_argument("--ceiling-only", action="store_true",
                        help="only the bare aiohttp ceiling, answering with a synthetic "
                             "Patient (no gateway; shows what the client can drive)")
    parser.add_argument("--no-sqlite-ceiling", action="store_true",
                        help="skip the bare aiohttp + sqlite3 SELECT ceiling")
    parser.add_argument("--bare-server", action="store_true",
                        help="run only the bare aiohttp server (prints its port) until SIGTERM")
    parser.add_argument("--bare-body", type=Path, help="--bare-server: the body to answer")
    parser.add_argument("--bare-db", type=Path,
                        help="--bare-server: answer from this fhir.db by primary key")
    parser.add_argument("--bare-port", type=int, default=0, help="port for --bare-server")
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="fail if any single answer takes longer than this (seconds)")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temp dir (configs, server logs, gateway data)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.client_procs < 0:
        parser.error("--seconds must be > 0, --warmup and --client-procs >= 0")
    if args.patients < 1 or args.bundle_size < 1:
        parser.error("--patients and --bundle-size must be >= 1")
    if args.ceiling_only and args.no_ceiling:
        parser.error("--ceiling-only and --no-ceiling exclude each other")
    return args


def run(args: argparse.Namespace) -> int:
    key = "bench-" + secrets.token_urlsafe(24)
    workdir = Path(tempfile.mkdtemp(prefix="isthmus-bench-fhir-"))
    audits = ["durable", "queued", "off"] if args.audit == "all" else [args.audit]
    print(f"fhir rest bench: {args.seconds:g} s per row, connections "
          f"{','.join(map(str, args.connections))}, {args.patients} Patients, warm-up "
          f"{args.warmup:g} s, {os.cpu_count()} cores", flush=True)
    procs = {c: min(c, args.client_procs or auto_client_procs(c)) for c in args.connections}
    print("client processes (column procs): "
          + ", ".join(f"{p} for {c} conn" for c, p in procs.items())
          + (" (fixed by --client-procs)" if args.client_procs else " (auto)"), flush=True)
    runs: list[GatewayRun] = []
    ceiling: list[PhaseResult] = []
    sqlite_ceiling: list[PhaseResult] = []
    floor: list[float] = []
    try:
        if args.ceiling_only:
            ceiling = bench_ceiling(args, workdir, key, synthetic_run(args.patients, workdir),
                                    with_db=False)
        for audit_reads in [] if args.ceiling_only else audits:
            runs.append(bench_gateway(args, workdir, key, audit_reads))
        # The durable rows wait for a disk sync per group commit: its latency, this run.
        floor = sync_floor(workdir) if "durable" in audits and not args.ceiling_only else []
        if runs and not args.no_ceiling:
            ceiling = bench_ceiling(args, workdir, key, runs[-1], with_db=False)
            # A sealed store's bodies are ciphertext: a bare SELECT would answer bytes no
            # client can read, which the checks count as errors.
            sealed = (runs[-1].data_dir / "encryption.json").exists()
            if sealed and not args.no_sqlite_ceiling:
                print("\nceiling aiohttp+sqlite: skipped, the store is sealed (encryption "
                      "at rest, the default)", flush=True)
            elif not args.no_sqlite_ceiling:
                sqlite_ceiling = bench_ceiling(args, workdir, key, runs[-1], with_db=True)
    except BenchError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep_tmp:
            print(f"temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = [r for run_ in runs for r in run_.rows]
    print_summary([*ceiling, *sqlite_ceiling, *rows], ceiling)
    off = [run_ for run_ in runs if run_.label == "audit off"]
    for run_ in runs:
        if off and run_ is not off[0]:
            print_audit_cost(run_.label, run_.rows, off[0].rows)
    print()
    for run_ in runs:
        for line in target_lines(run_.label, run_.rows, ceiling):
            print(line)
    if floor:
        print()
        for line in sync_floor_lines(floor, args.connections):
            print(line)
    failed = sum(r.errors for r in [*rows, *ceiling, *sqlite_ceiling])
    if failed:
        print(f"\nerror: {failed} requests were answered with an error (see the errors "
              "column); those rows do not measure what they say", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bare_server:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_bare("127.0.0.1", args.bare_port, args.bare_body, args.bare_db))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
