"""Isolation: one heavy message must not hold up the others (a benchmark, not a test).

What is measured
----------------
The gateway (started here, ``--workers N`` when given) takes small ADT^A01 messages on
``--connections`` lock-step MLLP connections while ``/healthz`` is polled every 10 ms;
with ``--rate N`` they are paced to N messages/s in all (each connection sends its next
message at its scheduled time, or at once when the previous ACK came late; the
connections' schedules are spread evenly over one interval, so a message arrives every
1/N s rather than all of them at once: `--burst` keeps them in step instead), so the
latency is measured below saturation: unpaced, 8 lock-step senders keep the gateway at
full throughput and their p99 is queueing (30-80 ms here) even with no heavy message.
After ``--warmup`` seconds of the same (printed, not compared), twice, in the same run:
first alone for ``--seconds`` (the peer), then while one more
connection sends one legal ORU^R01 of ``--observations`` OBX (20,000: about 5 MB); the
second phase lasts until that message's ACK. Printed per phase: small-message ACKs/s,
their p50/p99 latency, and /healthz p50/p99/max; and how long the heavy message took.

    python bench/isolation.py
    python bench/isolation.py --workers 0 --observations 20000
    python bench/isolation.py --rate 200
    python bench/isolation.py --rate 200 --burst     # the connections sending in step
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from apply_lag import TEMPLATE, frame, percentile, start_gateway


def heavy_oru(observations: int) -> bytes:
    note = "N" * 200
    head = ("MSH|^~\\&|BENCHLAB|BENCHFAC|ISTHMUS|GATEWAY|20261126083000||ORU^R01^ORU_R01|"
            f"HEAVY-{os.getpid()}|P|2.5.1\r"
            "PID|1||MRN-HEAVY^^^BENCHFAC^MR||HEAVYFAMILY^Given||19800102|F\r"
            "OBR|1|PL-1|FL-1|24331-1^Lipid panel^LN|||20261126080000\r")
    return (head + "".join(
        f"OBX|{n}|NM|2093-3^Cholesterol {note}^LN|{n}|180|mg/dL|<200|N|||F\r"
        for n in range(1, observations + 1))).encode()


async def small_sender(port: int, prefix: str, stop: asyncio.Event,
                       latencies: list[float], interval: float | None,
                       phase: float = 0.0) -> None:
    """`interval`: seconds between this connection's sends (None: lock-step, unpaced);
    `phase`: the share of an interval its schedule starts after the others'."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = 0
    due = time.perf_counter() + (interval or 0.0) * phase
    try:
        while not stop.is_set():
            if interval is not None:
                due += interval
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            n += 1
            payload = TEMPLATE.format(cid=f"{prefix}{n}", n=f"{prefix}{n}").encode()
            sent = time.perf_counter()
            writer.write(frame(payload))
            await reader.readuntil(b"\x1c\r")
            latencies.append(time.perf_counter() - sent)
    finally:
        writer.close()


async def health_poller(url: str, stop: asyncio.Event, latencies: list[float]) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            sent = time.perf_counter()
            async with session.get(url) as response:
                await response.read()
            latencies.append(time.perf_counter() - sent)
            await asyncio.sleep(0.01)


async def heavy_sender(port: int, payload: bytes) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        sent = time.perf_counter()
        writer.write(frame(payload))
        await writer.drain()
        reply = await reader.readuntil(b"\x1c\r")
        if b"MSA|AA|" not in reply:
            raise SystemExit(f"the heavy message was not accepted: {reply[:300]!r}")
        return time.perf_counter() - sent
    finally:
        writer.close()


async def phase(name: str, args: argparse.Namespace, mllp: int, http: int,
                heavy: bytes | None) -> None:
    stop = asyncio.Event()
    acks: list[float] = []
    health: list[float] = []
    prefix = f"I{os.getpid()}{name[0]}-"
    interval = args.connections / args.rate if args.rate else None
    # In step, eight senders' messages came eight at a time and the last of each eight
    # waited for the seven before it (a p99 of ~20-30 ms at 200 msg/s, none of it the
    # heavy message's): spread, the latency is the gateway's at that rate.
    phases = [0.0 if args.burst else c / args.connections for c in range(args.connections)]
    tasks = [asyncio.create_task(small_sender(mllp, f"{prefix}{c}-", stop, acks, interval,
                                              phases[c]))
             for c in range(args.connections)]
    tasks.append(asyncio.create_task(health_poller(f"http://127.0.0.1:{http}/healthz",
                                                   stop, health)))
    started = time.perf_counter()
    heavy_seconds = None
    if heavy is None:
        await asyncio.sleep(args.seconds)
    else:
        heavy_seconds = await heavy_sender(mllp, heavy)
    stop.set()
    elapsed = time.perf_counter() - started
    await asyncio.gather(*tasks)
    print(f"{name:<14} {len(acks) / elapsed:7.0f} msg/s  ACK p50 "
          f"{percentile(acks, 50) * 1000:7.2f} p99 {percentile(acks, 99) * 1000:8.2f} ms   "
          f"/healthz p50 {percentile(health, 50) * 1000:6.2f} p99 "
          f"{percentile(health, 99) * 1000:8.2f} max {max(health) * 1000:8.2f} ms"
          + (f"   heavy ACK after {heavy_seconds:.2f} s" if heavy_seconds else ""))


async def measure(args: argparse.Namespace, mllp: int, http: int) -> None:
    heavy = heavy_oru(args.observations)
    print(f"heavy message: {len(heavy) / 1e6:.1f} MB, {args.observations} OBX; "
          f"{args.connections} small-message connections, "
          + (f"paced to {args.rate:g} msg/s in all"
             + (", the connections in step" if args.burst else "") if args.rate
             else "lock-step, unpaced"))
    if args.warmup:
        # Unrecorded: the first messages pay for lazy imports and caches in every process.
        warm = argparse.Namespace(**{**vars(args), "seconds": args.warmup})
        await phase("warm-up", warm, mllp, http, None)
    await phase("alone (peer)", args, mllp, http, None)
    await phase("beside heavy", args, mllp, http, heavy)
    print("target: beside the heavy message, small ACK p99 <= 20 ms and /healthz <= 50 ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--observations", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of small messages before the peer phase (printed, "
                             "not compared)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--rate", type=float, default=None,
                        help="small messages/s across the connections (default: unpaced)")
    parser.add_argument("--burst", action="store_true",
                        help="with --rate: every connection sends at the same moments (the "
                             "schedule before 2026-12-07: bursts of --connections messages)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="isthmus-isolation-"))
    os.chmod(workdir, 0o700)
    proc, mllp, http = start_gateway(workdir, args.workers)
    try:
        asyncio.run(measure(args, mllp, http))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
