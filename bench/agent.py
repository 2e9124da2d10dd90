"""Agent API latency benchmark for the Isthmus gateway (a benchmark, not a test).

What is measured
----------------
The latency of agent calls in the remote shape, beside the EHR's own latency, in one run:

* ``ehr``: the fake EHR asked directly (``GET /fhir/Slot``, ``GET /fhir/Appointment?
  patient=...``): what any path through the gateway starts from.
* ``facade``: ``GET /fhir/Slot`` through the gateway's FHIR facade (``cache_ttl = 0``:
  every request goes to the EHR).
* ``agent verify``: ``POST /agent/v1/sessions`` (one Patient search by birth date at the
  EHR, matching, a session, the prefetch started; ``verify_floor = 0`` here so the
  floor that hides timing differences in production does not dominate the figure).
* ``agent cached``: ``GET /agent/v1/appointments``, answered from the session's cache
  (prefetched at verification): no EHR round trip.
* ``agent slots``: ``GET /agent/v1/slots``, through the facade's backend to the EHR
  (Slot search, then the Schedule, Practitioner and Location reads, all uncached).

Each row: ``--requests`` (default 300) calls, one at a time on one keep-alive
connection after 20 warm-up calls, timed with ``perf_counter_ns``; p50, p99 and mean
in ms. Every answer must be 2xx (else exit 1). ``--ehr-delay-ms`` makes the fake EHR wait
before each answer (default 0: the gateway's own cost shows; try 20 for a realistic EHR).

The fake EHR is this script with ``--fake-ehr --port P`` in its own process: bare aiohttp
serving one synthetic patient (invented data), its appointment, a schedule with its
practitioner and location, and 20 free slots, filtered by ``patient`` and ``_id`` only.
The gateway is ``python -m gateway --config FILE serve`` in its own process, on a fresh
data dir, with an agent API key, a reader API key, ``[fhir] audit_reads = "off"``, the
audit trail on (every agent call is recorded, as in production) and routes sending
every type the agent API reads to the fake EHR. Both are stopped with SIGTERM at the end.

How to run
----------
    python bench/agent.py
    python bench/agent.py --requests 1000 --ehr-delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/ is on sys.path when this file runs as a script.
from fhir_rest import serve_until_signal
from mllp_ingest import BenchError, ServerProcess

HTTP_READY_RE = re.compile(r"^isthmus listening mllp=\S+:\d+ http=(\S+):(\d+)$")
FAKE_READY_RE = re.compile(r"^isthmus-fake-ehr listening http=(\S+):(\d+)$")
AGENT_KEY = "bench-agent-key"
READER_KEY = "bench-reader-key"
FHIR_JSON = "application/fhir+json"
TYPES = ("Patient", "Appointment", "Slot", "Schedule", "Practitioner", "Location",
         "MedicationRequest", "MedicationDispense")


def records() -> list[dict[str, Any]]:
    """The fake EHR's synthetic clinic (invented data)."""
    found: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": "p1", "birthDate": "1980-01-02",
         "name": [{"family": "Benchperson", "given": ["Alex"]}],
         "telecom": [{"system": "phone", "value": "+1 555 010 0001"}]},
        {"resourceType": "Practitioner", "id": "dr1",
         "name": [{"family": "Lee", "given": ["Avery"], "prefix": ["Dr"]}]},
        {"resourceType": "Location", "id": "loc1", "name": "North Clinic"},
        {"resourceType": "Schedule", "id": "s1", "actor": [
            {"reference": "Practitioner/dr1"}, {"reference": "Location/loc1"}]},
        {"resourceType": "Appointment", "id": "a1", "status": "booked",
         "start": "2030-01-15T14:00:00Z", "end": "2030-01-15T14:30:00Z",
         "participant": [{"actor": {"reference": "Patient/p1"}},
                         {"actor": {"reference": "Practitioner/dr1"}},
                         {"actor": {"reference": "Location/loc1"}}]},
    ]
    for n in range(20):
        found.append({"resourceType": "Slot", "id": f"slot{n}", "status": "free",
                      "schedule": {"reference": "Schedule/s1"},
                      "start": f"2030-02-{n + 1:02d}T09:00:00Z",
                      "end": f"2030-02-{n + 1:02d}T09:30:00Z"})
    return found


async def serve_fake(host: str, port: int, delay: float) -> None:
    from aiohttp import web

    by_type: dict[str, list[dict[str, Any]]] = {}
    for resource in records():
        by_type.setdefault(resource["resourceType"], []).append(resource)

    def fits(resource: dict[str, Any], name: str, value: str) -> bool:
        if name == "_id":
            return resource["id"] in value.split(",")
        if name == "patient":
            return any(p.get("actor", {}).get("reference") == value
                       for p in resource.get("participant", []))
        return True

    async def search(request: web.Request) -> web.Response:
        if delay:
            await asyncio.sleep(delay)
        kind = request.match_info["type"]
        hits = [r for r in by_type.get(kind, [])
                if all(fits(r, k, v) for k, v in request.query.items())]
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(hits),
                  "entry": [{"resource": r, "search": {"mode": "match"}} for r in hits]}
        return web.Response(body=json.dumps(bundle), content_type=FHIR_JSON)

    async def read(request: web.Request) -> web.Response:
        if delay:
            await asyncio.sleep(delay)
        kind, ident = request.match_info["type"], request.match_info["id"]
        for resource in by_type.get(kind, []):
            if resource["id"] == ident:
                return web.Response(body=json.dumps(resource), content_type=FHIR_JSON)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/fhir/{type}", search)
    app.router.add_get("/fhir/{type}/{id}", read)
    await serve_until_signal(app, host, port, "isthmus-fake-ehr")


def gateway_config(ehr_port: int) -> str:
    keys = [("bench-agent", AGENT_KEY, '["agent"]'),
            ("bench-reader", READER_KEY, '["system/*.rs"]')]
    lines = ["[fhir]", 'audit_reads = "off"', "", "[agent]", "verify_floor = 0.0",
             'rate_limit = ""', ""]
    for name, key, scopes in keys:
        lines += ["[[auth.api_keys]]", f'name = "{name}"',
                  f'key_sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"',
                  f"scopes = {scopes}", ""]
    lines += ["[[backends]]", 'name = "ehr"', 'kind = "fhir"',
              f'base_url = "http://127.0.0.1:{ehr_port}/fhir"', "cache_ttl = 0", ""]
    for kind in TYPES:
        lines += ["[[routes]]", f'match = {{ resource = "{kind}" }}', 'to = ["ehr"]', ""]
    return "\n".join(lines)


async def timed(session: Any, method: str, url: str, headers: dict[str, str],
                body: Any, count: int) -> list[float]:
    """Milliseconds per call, one call at a time, after 20 warm-up calls."""
    samples = []
    for n in range(count + 20):
        started = time.perf_counter_ns()
        async with session.request(method, url, headers=headers, json=body) as response:
            await response.read()
            if response.status >= 300:
                raise BenchError(f"{method} {url} answered {response.status}")
        if n >= 20:
            samples.append((time.perf_counter_ns() - started) / 1e6)
    return samples


def row(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{name:<16} {len(samples):>8} {statistics.median(ordered):>8.2f} "
            f"{p99:>8.2f} {statistics.fmean(ordered):>8.2f}")


async def measure(gateway: str, ehr: str, count: int) -> list[str]:
    import aiohttp

    agent = {"X-API-Key": AGENT_KEY}
    reader = {"X-API-Key": READER_KEY, "Accept": FHIR_JSON}
    caller = {"purpose": "scheduling", "call_id": "bench-call", "last_name": "Benchperson",
              "date_of_birth": "1980-01-02", "phone": "555 010 0001"}
    async with aiohttp.ClientSession() as session:
        out = [row("ehr slots", await timed(session, "GET", f"{ehr}/fhir/Slot", {}, None,
                                            count)),
               row("ehr appointments", await timed(
                   session, "GET", f"{ehr}/fhir/Appointment?patient=Patient/p1", {}, None,
                   count)),
               row("facade slots", await timed(session, "GET", f"{gateway}/fhir/Slot",
                                               reader, None, count))]
        verify = await timed(session, "POST", f"{gateway}/agent/v1/sessions", agent,
                             caller, count)
        out.append(row("agent verify", verify))
        async with session.post(f"{gateway}/agent/v1/sessions", headers=agent,
                                json=caller) as response:
            token = (await response.json())["session_token"]
        with_session = {**agent, "X-Session-Token": token}
        out.append(row("agent cached", await timed(
            session, "GET", f"{gateway}/agent/v1/appointments", with_session, None, count)))
        out.append(row("agent slots", await timed(
            session, "GET", f"{gateway}/agent/v1/slots?from=2030-01-01&to=2030-12-31",
            with_session, None, count)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--ehr-delay-ms", type=float, default=0.0)
    parser.add_argument("--fake-ehr", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args(argv)
    if args.fake_ehr:
        asyncio.run(serve_fake("127.0.0.1", args.port, args.ehr_delay_ms / 1000))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="isthmus-bench-agent-"))
    fake = ServerProcess("fake-ehr", [sys.executable, str(Path(__file__).resolve()),
                                      "--fake-ehr", "--ehr-delay-ms",
                                      str(args.ehr_delay_ms)], FAKE_READY_RE, tmp)
    gateway: ServerProcess | None = None
    try:
        ehr_host, ehr_port = fake.start(30)
        data_dir = tmp / "data"
        data_dir.mkdir(mode=0o700)
        config = tmp / "isthmus.toml"
        config.write_text(gateway_config(ehr_port))
        gateway = ServerProcess("gateway", [
            sys.executable, "-m", "gateway", "--config", str(config), "serve", "--host",
            "127.0.0.1", "--mllp-port", "0", "--http-port", "0", "--data-dir",
            str(data_dir)], HTTP_READY_RE, tmp)
        host, port = gateway.start(60)
        rows = asyncio.run(measure(f"http://{host}:{port}", f"http://{ehr_host}:{ehr_port}",
                                   args.requests))
        print(f"EHR delay {args.ehr_delay_ms:g} ms; one call at a time, one connection")
        print(f"{'path':<16} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
        for line in rows:
            print(line)
        return 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for server in (fake, gateway):
            if server is not None:
                print(server.log_tail(), file=sys.stderr)
        return 1
    finally:
        if gateway is not None:
            gateway.stop()
        fake.stop()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
