"""Instructions per applied message, counted by valgrind: the apply worker's store path
(`bundle_writes` and `SqliteFhirStore.transact`, sealed, group commits of 64) as a figure
the load of a shared machine does not move (user space only: the kernel's share of the
WAL writes is not counted).

    python bench/store_instructions.py [--tree DIR] [--messages 200] [--warm 72]

The Bundles of `--messages` `apply_lag.py` messages are made first (natively) and pickled;
then a child under `valgrind --tool=callgrind` applies the first `--warm` of them and
stops, and another applies them all; (all - warm) / (messages - warm) is the figure.
`--tree` measures another checkout (e.g. a `git archive` of main) with the same Bundles.
About 7 minutes per child on a loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, os, pickle, tempfile
from pathlib import Path
from gateway.fhir.search import TABLE, SearchRegistry
from gateway.ingest.applier import bundle_writes
from gateway.mapping.tables import SHIPPED
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.sealing import DataKey, KeyRing, SealedCodec

async def main():
    bundles = pickle.loads(open(os.environ["BENCH_BUNDLES"], "rb").read())
    count = int(os.environ["BENCH_COUNT"])
    registry = SearchRegistry.load(SHIPPED / TABLE)
    codec = SealedCodec(KeyRing((DataKey.from_secret("bench", b"k" * 32),)), "bench")
    with tempfile.TemporaryDirectory() as directory:
        # A tree from before shared string rows has no string groups to pass.
        groups = ({"string_groups": registry.string_groups()}
                  if hasattr(registry, "string_groups") else {})
        store = await SqliteFhirStore.open(Path(directory) / "fhir.db", registry.index,
                                           synchronous="full", codec=codec, **groups)
        for first in range(0, count, 64):
            await asyncio.gather(*(store.transact(bundle_writes(registry, b))
                                   for b in bundles[first:min(first + 64, count)]))
        await store.close()

asyncio.run(main())
"""


def bundles(count: int) -> bytes:
    sys.path.insert(0, str(ROOT))
    from apply_lag import TEMPLATE  # bench/ is this script's first path entry

    from gateway.fhir.bundle import to_bundle
    from gateway.hl7.message import parse_message
    from gateway.mapping.engine import Translator
    from gateway.mapping.tables import SHIPPED

    translator = Translator.load(SHIPPED)
    at = datetime(2026, 12, 6, tzinfo=UTC)
    return pickle.dumps([to_bundle(translator.translate(parse_message(
        TEMPLATE.format(cid=f"G{n}", n=f"G{n}").encode()), at)) for n in range(count)])


def instructions(tree: Path, path: Path, count: int) -> int:
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "callgrind.out"
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        sys.executable, "-c", CHILD], cwd=tree, check=True,
                       capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(tree),
                            "BENCH_BUNDLES": str(path), "BENCH_COUNT": str(count)})
        found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        assert found is not None, "no totals in the callgrind output"
        return int(found[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--warm", type=int, default=72)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".pkl") as made:
        made.write(bundles(args.messages))
        made.flush()
        warm = instructions(args.tree, Path(made.name), args.warm)
        full = instructions(args.tree, Path(made.name), args.messages)
    print(f"{args.tree}: {(full - warm) / (args.messages - args.warm) / 1e6:.2f} M "
          f"instructions a message (all {full:,}, warm-up {warm:,})")


if __name__ == "__main__":
    main()
