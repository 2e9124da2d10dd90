"""A large commit beside small ones in SQLite (a benchmark, not a test).

Why: beside the 5 MB message of `isolation.py`, the small ACKs that wait longest wait for
that message's inbox commit (its WAL write and fdatasync hold the inbox's one writer for
50-150 ms). This asks whether the large payload in another database file (another fsync
domain on the same disk) would leave the small commits alone.

A thread commits small rows (WAL, synchronous=FULL, as the inbox) every 5 ms into a.db;
after 1 s another thread commits one `--mb` MB blob, into a.db (`same`: it takes the
write lock) or into b.db (`other`). Printed: that commit's time, and the small commits'
p50/p99/max and the ones over 20 ms.

    python bench/heavy_commit.py [--mb 5.2] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, b BLOB)")
    return db


def run(where: str, size: int, workdir: Path) -> None:
    small = connect(workdir / "a.db")
    large = connect(workdir / ("a.db" if where == "same" else "b.db"))
    blob = os.urandom(size)  # incompressible, as a sealed payload is
    started = time.perf_counter()
    took: list[float] = []

    def heavy() -> None:
        time.sleep(1.0)
        t = time.perf_counter()
        large.execute("INSERT INTO t (b) VALUES (?)", (blob,))
        took.append(time.perf_counter() - t)

    thread = threading.Thread(target=heavy)
    thread.start()
    latencies: list[tuple[float, float]] = []
    while time.perf_counter() < started + 2.5:
        t = time.perf_counter()
        small.execute("INSERT INTO t (b) VALUES (?)", (b"x" * 800,))
        latencies.append((t - started, time.perf_counter() - t))
        time.sleep(0.005)
    thread.join()
    small.close()
    large.close()
    ordered = sorted(latency for _, latency in latencies)
    slow = [f"{at:.3f} s: {latency * 1000:.1f} ms" for at, latency in latencies
            if latency > 0.02]
    print(f"{where:<6} large commit {took[0] * 1000:6.1f} ms; {len(ordered)} small commits "
          f"p50 {ordered[len(ordered) // 2] * 1000:.1f} p99 "
          f"{ordered[int(len(ordered) * 0.99)] * 1000:.1f} max {ordered[-1] * 1000:.1f} ms; "
          f"over 20 ms: {', '.join(slow) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=5.2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.runs):
        for where in ("same", "other"):
            workdir = Path(tempfile.mkdtemp(prefix="isthmus-heavy-commit-"))
            try:
                run(where, int(args.mb * 1e6), workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
