"""Memory under a flood of large messages (a benchmark, not a test).

What is measured
----------------
The gateway (started here, with ``--budget`` as ``processes.memory_budget_bytes``) takes
``--messages`` ADT^A01 messages grown to ``--size`` bytes by a Z-segment, sent pipelined
(all at once) over ``--connections`` connections; a message answered AR ("resend later")
is sent again after that round's ACKs. The edge's RSS (and the sum over its child
processes: apply workers, the large-frame process) is read from /proc every 20 ms,
from before the flood until every message is applied and ``--settle`` seconds more.
Printed: the edge's RSS at the start, its peak, its RSS at the end; the children's peak;
ACK counts; how long the flood took. A warm-up of two messages per connection comes first.

    python bench/memory_flood.py                                  # 80 x 10 MB, 8 conns
    python bench/memory_flood.py --budget 33554432 --messages 40
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from apply_lag import TEMPLATE, frame, start_gateway

MIB = 1024 * 1024


def padded(control_id: str, size: int) -> bytes:
    raw = TEMPLATE.format(cid=control_id, n=control_id).encode()
    return raw + b"ZPD|1|" + b"x" * max(0, size - len(raw) - 7) + b"\r"


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def applied(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "inbox.db") as db:
        return int(db.execute("SELECT count(*) FROM inbox WHERE status = 'applied'")
                   .fetchone()[0])


async def pipeline(port: int, prefix: str, count: int, size: int, codes: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    pending = [f"{prefix}-{n}" for n in range(count)]
    try:
        while pending:
            async def send(ids: list[str]) -> None:
                for control_id in ids:
                    writer.write(frame(padded(control_id, size)))
                    await writer.drain()
            sending = asyncio.create_task(send(pending))
            refused = []
            for control_id in pending:
                reply = await reader.readuntil(b"\x1c\r")
                msa = reply.split(b"MSA|", 1)[1].split(b"|", 2)
                assert msa[1].split(b"\r")[0] == control_id.encode(), reply[:200]
                code = msa[0].decode()
                codes.append(code)
                if code == "AR":
                    refused.append(control_id)
            await sending
            pending = refused
    finally:
        writer.close()


async def sample(pid: int, stop: asyncio.Event, edge: list[int], kids: list[int]) -> None:
    while not stop.is_set():
        edge.append(rss_kib(pid))
        kids.append(sum(rss_kib(c) for c in children(pid)))
        await asyncio.sleep(0.02)


async def run(args: argparse.Namespace, work: Path) -> None:
    os.environ["ISTHMUS_PROCESSES__MEMORY_BUDGET_BYTES"] = str(args.budget)
    os.environ["ISTHMUS_STORE__SYNCHRONOUS"] = "normal"
    os.environ["ISTHMUS_MLLP__MAX_FRAME_BYTES"] = str(max(args.size + 1024, 1024 * 1024))
    proc, mllp_port, _ = start_gateway(work, args.workers)
    data = work / "var"
    try:
        warm: list[str] = []
        await asyncio.gather(*(pipeline(mllp_port, f"W{c}", 2, args.size, warm)
                               for c in range(args.connections)))
        while applied(data) < 2 * args.connections:
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
        start = rss_kib(proc.pid)
        edge: list[int] = []
        kids: list[int] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(proc.pid, stop, edge, kids))
        codes: list[str] = []
        began = time.perf_counter()
        per = args.messages // args.connections
        await asyncio.gather(*(pipeline(mllp_port, f"F{c}", per, args.size, codes)
                               for c in range(args.connections)))
        acked = time.perf_counter() - began
        total = 2 * args.connections + per * args.connections
        while applied(data) < total:
            await asyncio.sleep(0.2)
        drained = time.perf_counter() - began
        await asyncio.sleep(args.settle)
        stop.set()
        await sampler
        end = rss_kib(proc.pid)
        print(f"messages {per * args.connections} x {args.size / MIB:.1f} MiB over "
              f"{args.connections} connections, budget {args.budget / MIB:.0f} MiB")
        print(f"ACKs: AA {codes.count('AA')}, AR {codes.count('AR')}, other "
              f"{len(codes) - codes.count('AA') - codes.count('AR')}; all ACKed in "
              f"{acked:.1f} s, applied in {drained:.1f} s")
        print(f"edge RSS: start {start / 1024:.0f} MiB, peak {max(edge) / 1024:.0f} MiB "
              f"(+{(max(edge) - start) / 1024:.0f}), end {end / 1024:.0f} MiB "
              f"({100 * (end - start) / start:+.0f}%)")
        print(f"children RSS (sum): peak {max(kids) / 1024:.0f} MiB, end "
              f"{kids[-1] / 1024:.0f} MiB")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=80)
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--budget", type=int, default=256 * MIB)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--settle", type=float, default=8.0)
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="isthmus-memory-"))
    try:
        asyncio.run(run(args, work))
    finally:
        if args.keep_tmp:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
