"""Instructions per durable audit record, counted by valgrind: the record's CPU as a figure
that the load of a shared machine does not move.

    python bench/audit_instructions.py [--tree DIR] [--count N]

Under `valgrind --tool=callgrind` a child opens a fresh `AuditLog` (`synchronous =
full`) and has 8 concurrent producers submit read records (a patient and a resource id,
what a FHIR read records; 800 patients), each waiting for its record to be durable and
yielding three event-loop turns before the next, as `bench/audit_handoff.py`'s direct
mode does; a second child makes N more. The difference divided by N is what one record
costs in user space, both threads (sealing, submitting, the writer task, the SQLite
thread's binding and INSERT, the hop and the completions), start-up excluded; the
kernel's share (pwrite, fdatasync) is not counted. Beside it, the instructions of
`seal` and of the record's time stamp alone. `--tree` measures another checkout (a `git
archive` of main) so two trees compare exactly. Each child runs ~50x slower than natively.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# bench/ is on sys.path when this file runs as a script.
from translate_instructions import callgrind_total

ROOT = Path(__file__).resolve().parent.parent

# The child imports only the measured tree's code; it makes its keys in a temp dir.
CHILD = r"""
import asyncio, sys, tempfile
from datetime import UTC, datetime
from pathlib import Path
from gateway.audit.keys import load_keys
from gateway.audit.log import AuditLog
from gateway.audit.record import Action, AuditRecord
from gateway.audit.record import timestamp
from gateway.audit.sealed import seal

what, count = sys.argv[1], int(sys.argv[2])
data = Path(tempfile.mkdtemp())
keys, _ = load_keys(default_dir=data / "keys", key_file=None, keys_text=None,
                    signing_key_file=None, signing_key_text=None, create=True)

def record(producer, number):
    return AuditRecord(Action.READ, client_id="bench", peer="127.0.0.1",
                       resource_type="Patient", resource_id=f"Patient/b{producer}-{number}",
                       patient=f"Patient/b{producer}-{number % 100}")

async def durable():
    log = await AuditLog.open(data / "audit.db", keys)
    async def producer(p):
        for i in range(count // 8):
            await log.submit(record(p, i))
            for _ in range(3):
                await asyncio.sleep(0)
    await asyncio.gather(*(producer(p) for p in range(8)))
    await log.close()

if what == "record":
    asyncio.run(durable())
elif what == "seal":
    rows = [record(0, i) for i in range(100)]
    when = timestamp(datetime.now(UTC))
    for i in range(count):
        seal(rows[i % 100], when, keys.ring, "isthmus")
else:
    try:
        from gateway.audit.record import now_timestamp as now
    except ImportError:  # before the remembered-second clock
        now = lambda: timestamp(datetime.now(UTC))
    for _ in range(count):
        now()
"""


def instructions(tree: Path, what: str, count: int) -> int:
    return callgrind_total(tree, [CHILD, what, str(count)], {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout to measure")
    parser.add_argument("--count", type=int, default=4000, help="records counted")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed")
    print(f"instructions per call ({args.tree})")
    for what, count in (("record", args.count), ("seal", 5 * args.count),
                        ("time", 5 * args.count)):
        base = instructions(args.tree, what, 800 if what == "record" else 200)
        total = instructions(args.tree, what, count + (800 if what == "record" else 200))
        label = {"record": "durable read record", "seal": "seal",
                 "time": "record time stamp"}[what]
        print(f"{label:<22} {(total - base) / count:>10,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
