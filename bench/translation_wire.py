"""A Translation's hop between processes: bytes, write and read time, pickle against the
wire form (`gateway/canonical/wire.py`), for each message of `bench/translate.py`.

    python bench/translation_wire.py [--only TYPE] [--instructions]

The translator writes a Translation for the apply worker (through the edge), which holds
the bytes until the message's inbox row comes up and reads them then. Printed per message
type: the bytes, the write (`encode`, on the translator) and the read (`decode`, on the
apply worker, the end-to-end bottleneck) in microseconds, best of many short runs;
"pickle" is the models pickled as `_Record` reduces them (the form before). With
`--instructions` each figure is counted by valgrind instead (as
`bench/translate_instructions.py` does: a child that runs it 20 + 200 times, less one that
runs it 20 times): a figure the load of a shared machine does not move.
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from translate import MESSAGES  # noqa: E402
from translate_instructions import callgrind_total  # noqa: E402

from gateway.canonical import wire  # noqa: E402
from gateway.canonical.models import Translation  # noqa: E402
from gateway.hl7.message import parse_message  # noqa: E402
from gateway.mapping.engine import Translator  # noqa: E402

# The child for --instructions: one operation, counted (argv: the operation, the count).
# The Translation comes in a file in the wire form (`decode` builds it as the engine does):
# loading the tables under valgrind took minutes.
CHILD = r"""
import os, pickle, sys
from pathlib import Path
from gateway.canonical import wire

made = wire.decode(Path(os.environ["BENCH_TRANSLATION"]).read_bytes())
pickled = pickle.dumps(made, protocol=pickle.HIGHEST_PROTOCOL)
encoded = wire.encode(made)
operation = {
    "pickle.dumps": lambda: pickle.dumps(made, protocol=pickle.HIGHEST_PROTOCOL),
    "pickle.loads": lambda: pickle.loads(pickled),
    "wire.encode": lambda: wire.encode(made),
    "wire.decode": lambda: wire.decode(encoded),
}[sys.argv[1]]
for _ in range(20 + int(sys.argv[2])):
    operation()
"""
_COUNTED = 200
_OPERATIONS = ("pickle.dumps", "pickle.loads", "wire.encode", "wire.decode")


def microseconds(operation: Callable[[], object], runs: int = 40, each: int = 200) -> float:
    """Best time of `each` calls over `runs` runs, per call: the least disturbed run of a
    shared machine."""
    best = float("inf")
    for _ in range(runs):
        started = time.thread_time()
        for _ in range(each):
            operation()
        best = min(best, (time.thread_time() - started) / each)
    return best * 1e6


def instructions(made: Translation, operation: str) -> float:
    with tempfile.NamedTemporaryFile(suffix=".wire") as file:
        file.write(wire.encode(made))
        file.flush()
        env = {"BENCH_TRANSLATION": file.name}
        total = callgrind_total(ROOT, [CHILD, operation, str(_COUNTED)], env)
        return (total - callgrind_total(ROOT, [CHILD, operation, "0"], env)) / _COUNTED


def timed(made: Translation) -> list[float]:
    pickled = pickle.dumps(made, protocol=pickle.HIGHEST_PROTOCOL)
    encoded = wire.encode(made)
    return [microseconds(lambda: pickle.dumps(made, protocol=pickle.HIGHEST_PROTOCOL)),
            microseconds(lambda: pickle.loads(pickled)),
            microseconds(lambda: wire.encode(made)),
            microseconds(lambda: wire.decode(encoded))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="one message type (e.g. 'ADT^A01')")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions with valgrind instead of timing")
    args = parser.parse_args()
    if args.instructions and shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed")
    translator = Translator.load()
    unit = "instructions" if args.instructions else "us"
    print(f"{'message type':<18} {'res':>3} {'pickle B':>8} {'wire B':>6}   "
          f"{'dumps':>9} {'loads':>9} {'encode':>9} {'decode':>9}  ({unit})")
    for name, message in MESSAGES.items():
        if args.only and name != args.only:
            continue
        made = translator.translate(parse_message(message.encode()),
                                    datetime(2026, 12, 7, tzinfo=UTC))
        encoded = wire.encode(made)
        if wire.decode(encoded) != made:
            sys.exit(f"{name}: the wire form did not come back equal")
        figures = ([instructions(made, op) for op in _OPERATIONS] if args.instructions
                   else timed(made))
        size = len(pickle.dumps(made, protocol=pickle.HIGHEST_PROTOCOL))
        print(f"{name:<18} {len(made.resources):>3} {size:>8,} {len(encoded):>6,}   "
              + " ".join(f"{figure:>9,.1f}" if not args.instructions else f"{figure:>9,.0f}"
                         for figure in figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
