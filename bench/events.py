"""Change events benchmark (a benchmark, not a test).

Two measurements, for 0, 1, 100 and 1,000 active FHIR Subscriptions (`--subs`), each on
a fresh temp store, the event pump running in the same process and event loop as the
writes (its matching competes with them for the CPU, as in the gateway's edge):

* the write path: Observation updates straight through `SqliteFhirStore.transact` by
  `--writers` concurrent writers (group commit) that no Subscription matches, so what is
  added is recording the event and matching it against N Subscriptions (half
  `Observation?patient=Patient/qK`, half `Observation?code=dK`: both found by the
  matcher's index). Wall time and this process's CPU time per write, against the 0 row of
  the same run (the issue's bound: within 10% at 100), and against the peer: the same
  writes on a store with its event triggers dropped (no events at all);
* notifications/s: the same writes when each matches exactly one Subscription
  (`Observation?patient=Patient/pK`, the writes spread over the N patients), delivered
  with a FHIR payload, signed, through the outbox, to a receiver in another process;
  from the first write until the last notification is received.

Rounds are interleaved (a change in the machine's load hits every row alike) and the
median is shown.

How to run:
    python bench/events.py [--writes 600] [--writers 8] [--subs 0,1,100,1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sqlite3
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.app.events import Flattener, ReadGate
from gateway.edge.fhir_api import FhirApi, FhirLimits
from gateway.events.pump import EventPump, PumpSpec
from gateway.events.subscriptions import OWNER_URL
from gateway.fhir.search import SearchRegistry
from gateway.forward.outbox import DeliveryPolicy, Dispatcher
from gateway.mapping.tables import SHIPPED
from gateway.store.events import SqliteEventLog, SqliteEventQueue
from gateway.store.fhir import WriteRequest
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.inbox_sqlite import SqliteInbox
from gateway.store.outbox import SqliteOutbox
from gateway.telemetry import configure

PATIENTS = 50


def subscription(i: int, url: str, matching: bool) -> dict[str, Any]:
    if matching:
        criteria = f"Observation?patient=Patient/p{i}"
    else:
        criteria = (f"Observation?patient=Patient/q{i}" if i % 2 == 0
                    else f"Observation?code=d{i}")
    return {"resourceType": "Subscription", "status": "active", "reason": "bench",
            "criteria": criteria,
            "channel": {"type": "rest-hook", "endpoint": url,
                        "payload": "application/fhir+json"},
            "extension": [{"url": OWNER_URL, "extension": [
                {"url": "client", "valueString": "bench"},
                {"url": "scope", "valueString": "system/*.rs"}]}]}


def observation(n: int, value: int, patients: int) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "urn:bench", "code": "c0"}]},
            "subject": {"reference": f"Patient/p{n % patients}"},
            "valueQuantity": {"value": value, "unit": "mmHg"}}


def _serve(port: Any, count: Any) -> None:
    """The receiver, in a process of its own (its work is not the gateway's)."""
    async def hook(request: web.Request) -> web.Response:
        await request.read()
        with count.get_lock():
            count.value += 1
        return web.Response(status=200)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port.value = runner.addresses[0][1]
        await asyncio.Event().wait()

    asyncio.run(main())


class Receiver:
    def __init__(self) -> None:
        self._port = multiprocessing.Value("i", 0)
        self.count = multiprocessing.Value("i", 0)
        self._proc = multiprocessing.Process(target=_serve, args=(self._port, self.count),
                                             daemon=True)

    async def start(self) -> str:
        self._proc.start()
        while not self._port.value:
            await asyncio.sleep(0.01)
        return f"http://127.0.0.1:{self._port.value}/hook"

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.join()


async def writes(store: SqliteFhirStore, count: int, writers: int,
                 patients: int) -> tuple[float, float]:
    """Wall and CPU seconds for `count` updates by `writers` concurrent writers."""
    async def writer(k: int) -> None:
        for n in range(k, count, writers):
            await store.transact([WriteRequest("PUT", "Observation", f"o{n % 200}",
                                               observation(n, n, patients))])

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(writer(k) for k in range(writers)))
    return time.perf_counter() - started, time.process_time() - cpu


async def run(subs: int, count: int, writers: int, events: bool,
              matching: bool = False) -> dict[str, float]:
    registry = SearchRegistry.load(SHIPPED / "search-parameters.csv")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = await SqliteFhirStore.open(root / "fhir.db", registry.index,
                                           synchronous="normal")
        inbox = await SqliteInbox.open(root / "inbox.db", "normal",
                                       dedup_window=timedelta(days=1),
                                       max_batch=256)
        receiving = Receiver()
        url = await receiving.start()
        for n in range(200):  # the resources updated, created before the clock starts
            await store.transact([WriteRequest("PUT", "Observation", f"o{n}",
                                               observation(n, -1, 1))])
        for i in range(subs):
            await store.transact([WriteRequest("PUT", "Subscription", f"s{i}",
                                               subscription(i, url, matching))])
        if not events:
            with sqlite3.connect(root / "fhir.db") as db:
                db.execute("DROP TRIGGER fhir_resource_event_insert")
                db.execute("DROP TRIGGER fhir_resource_event_update")
        telemetry = configure("none")
        dispatcher = Dispatcher(SqliteOutbox(inbox.connection), {}, {}, telemetry,
                                poll_interval=1.0)
        await dispatcher.start()
        api = FhirApi.build(store, registry, telemetry, FhirLimits(), {}, None)
        log = await SqliteEventLog.open(root / "fhir.db")
        queue = await SqliteEventQueue.open(root / "inbox.db")
        spec = PumpSpec((), lambda client: b"bench-secret", DeliveryPolicy(concurrency=4),
                        poll_interval=0.05)
        pump = EventPump(log, queue, store, registry, dispatcher, ReadGate(api),
                         Flattener(store), spec)
        await pump.start()
        # The start's burst (each target's worker reads its rows once) is over before
        # the clock starts: what is measured is the steady state.
        await dispatcher.drain(600)
        attached = len(pump.matcher)
        try:
            started, cpu_start = time.perf_counter(), time.process_time()
            seconds, _ = await writes(store, count, writers,
                                      max(subs, 1) if matching else PATIENTS)
            await pump.drain(600)  # the matching's CPU belongs to the writes
            cpu = time.process_time() - cpu_start
            expected = pump.notifications
            deadline = time.monotonic() + 600
            while receiving.count.value < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            delivered_in = time.perf_counter() - started
        finally:
            await pump.close()
            await dispatcher.close()
            await queue.close()
            await log.close()
            receiving.stop()
            await inbox.close()
            await store.close()
        return {"subs": subs, "active": attached, "seconds": seconds,
                "writes_s": count / seconds, "us_per_write": seconds / count * 1e6,
                "cpu_us_per_write": cpu / count * 1e6,
                "notifications": receiving.count.value,
                "notes_s": receiving.count.value / delivered_in}


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over rounds."""
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=600)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--subs", default="0,1,100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    counts = [int(n) for n in args.subs.split(",")]
    peers: list[dict[str, float]] = []
    quiet: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    loud: dict[int, list[dict[str, float]]] = {n: [] for n in counts if n}
    for _ in range(args.rounds):  # interleaved: a load change hits every row alike
        peers.append(await run(0, args.writes, args.writers, events=False))
        for n in counts:
            quiet[n].append(await run(n, args.writes, args.writers, events=True))
            if n:
                loud[n].append(await run(n, args.writes, args.writers, events=True,
                                         matching=True))
    peer = _median(peers)
    rows = [_median(quiet[n]) for n in counts]
    base = next((r for r in rows if r["subs"] == 0), rows[0])
    print(f"write path, no Subscription matching the writes ({args.writes} writes, "
          f"{args.writers} writers, median of {args.rounds}):")
    print(f"peer (no event triggers): {peer['writes_s']:,.0f} writes/s, "
          f"{peer['us_per_write']:,.0f} us/write, {peer['cpu_us_per_write']:,.0f} CPU us/write")
    print("| subscriptions | writes/s | us/write | vs 0 | CPU us/write | CPU vs 0 | "
          "CPU vs no events |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['subs']:,} | {r['writes_s']:,.0f} | {r['us_per_write']:,.0f} | "
              f"{r['us_per_write'] / base['us_per_write'] - 1:+.1%} | "
              f"{r['cpu_us_per_write']:,.0f} | "
              f"{r['cpu_us_per_write'] / base['cpu_us_per_write'] - 1:+.1%} | "
              f"{r['cpu_us_per_write'] / peer['cpu_us_per_write'] - 1:+.1%} |")
    print("notifications, each write matching one Subscription:")
    print("| subscriptions | writes/s | notifications | notifications/s | CPU us/write |")
    print("| --- | --- | --- | --- | --- |")
    for n, runs in loud.items():
        r = _median(runs)
        print(f"| {n:,} | {r['writes_s']:,.0f} | {r['notifications']:,.0f} | "
              f"{r['notes_s']:,.0f} | {r['cpu_us_per_write']:,.0f} |")
    hundred = next((r for r in rows if r["subs"] == 100), None)
    if hundred is not None:
        wall = hundred["us_per_write"] / base["us_per_write"] - 1
        cpu = hundred["cpu_us_per_write"] / base["cpu_us_per_write"] - 1
        verdict = "PASS" if max(wall, cpu) <= 0.10 else "MISS"
        print(f"target: write cost at 100 Subscriptions within 10% of 0: wall {wall:+.1%}, "
              f"CPU {cpu:+.1%} {verdict}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
