"""Instructions per translation, counted by valgrind: a translation speed figure that the
load of a shared machine does not move.

    python bench/translate_instructions.py [--tree DIR] [--count N] [--only TYPE]

For each message of `bench/translate.py` it runs, under `valgrind --tool=callgrind`, a child
that loads the generated tables, translates the message 20 times (warm-up) and then N more
times (default 100), and a child that stops after the warm-up; the difference divided by N
is the instructions of one translation (parse, translate, Bundle, orjson bytes), start-up
excluded. `--tree` measures another checkout (e.g. a `git archive` of main) with the same
messages, so two trees compare exactly. Each child runs ~50x slower than natively: about
half a minute per message type and count.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The child imports only the measured tree's code (the message comes in its environment).
CHILD = r"""
import os, sys
from gateway.config.cache import compiled_tables_dir
from gateway.fhir.bundle import dumps, to_bundle
from gateway.hl7.message import parse_message
from gateway.mapping.engine import Translator

translator = Translator.load(cache=compiled_tables_dir(), generate=True)
raw = os.environ["BENCH_MESSAGE"].encode()
for _ in range(20 + int(sys.argv[1])):
    dumps(to_bundle(translator.translate(parse_message(raw))))
"""


def instructions(tree: Path, message: str, count: int) -> int:
    """Instructions valgrind counted for a child translating `message` 20 + count times."""
    return callgrind_total(tree, [CHILD, str(count)], {"BENCH_MESSAGE": message})


def callgrind_total(tree: Path, child: list[str], env: dict[str, str]) -> int:
    """Instructions valgrind counted for `python -c *child` run in `tree` (its code first on
    the path, `env` added to this environment). Shared by the *_instructions benches."""
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, "-c", *child],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), **env},
        capture_output=True, text=True, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        sys.exit(f"no instruction count from valgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> int:
    from bench.translate import MESSAGES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout to measure")
    parser.add_argument("--count", type=int, default=100, help="translations counted")
    parser.add_argument("--only", help="one message type (e.g. 'ADT^A01')")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed")
    # The tree's generated tables, written to the cache now if they are not there yet:
    # else the first child below would count their generation too.
    subprocess.run([sys.executable, "-c", CHILD, "0"], cwd=args.tree, check=True,
                   env={**os.environ, "PYTHONPATH": str(args.tree),
                        "BENCH_MESSAGE": MESSAGES["ADT^A01"]})
    print(f"{'message type':<18} {'instructions/msg':>16}   ({args.tree})")
    for name in MESSAGES:
        if args.only and name != args.only:
            continue
        base = instructions(args.tree, MESSAGES[name], 0)
        total = instructions(args.tree, MESSAGES[name], args.count)
        print(f"{name:<18} {(total - base) / args.count:>16,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
