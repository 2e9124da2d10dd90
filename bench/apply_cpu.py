"""The apply worker's CPU per message, in one process (a benchmark, not a test).

What is measured: what an apply worker does with `apply_lag.py`'s ADT^A01 (a new patient
each) once its row comes up, without the edge, the inbox or MLLP: the translation's wire
form (`canonical/wire.py`, as kept for the worker) decoded, made into store writes
(`translation_writes`) and applied to a sealed store (synchronous = full) in group commits
of `--batch`, as `LocalApplier._apply` submits them. Printed: the process's CPU (user +
system) per message after `--warm` messages, which `bench/apply_lag.py`'s "apply worker CPU
per message" holds plus the inbox's reads and marks and the edge's hand-over.

`--profile FILE` writes a cProfile of the measured part (its overhead inflates Python
against SQLite: read its shares, not its times).

    python bench/apply_cpu.py [--messages 3000] [--batch 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apply_lag import TEMPLATE  # noqa: E402

from gateway.canonical import wire  # noqa: E402
from gateway.fhir.search import TABLE, SearchRegistry  # noqa: E402
from gateway.hl7.message import parse_message  # noqa: E402
from gateway.ingest.writes import translation_writes  # noqa: E402
from gateway.mapping.engine import Translator  # noqa: E402
from gateway.mapping.tables import SHIPPED  # noqa: E402
from gateway.store.fhir_sqlite import SqliteFhirStore  # noqa: E402
from gateway.store.sealing import DataKey, KeyRing, SealedCodec  # noqa: E402


async def apply_all(registry: SearchRegistry, kept: list[bytes], batch: int, warm: int,
                    profile: cProfile.Profile | None,
                    writer_profile: cProfile.Profile | None = None) -> float:
    """CPU seconds per message past the first `warm`, applied in groups of `batch`."""
    codec = SealedCodec(KeyRing((DataKey.from_secret("bench", b"k" * 32),)), "bench")

    async def one(data: bytes) -> None:
        await store.transact(translation_writes(registry, wire.decode(data)), atomic=True)

    with tempfile.TemporaryDirectory() as directory:
        store = await SqliteFhirStore.open(Path(directory) / "fhir.db", registry.index,
                                           synchronous="full", codec=codec,
                                           string_groups=registry.string_groups())
        try:
            for first in range(0, warm, batch):
                await asyncio.gather(*(one(d) for d in kept[first:min(first + batch, warm)]))
            if profile is not None:
                profile.enable()
                # The writer thread's work is most of it: profiled there too.
                await asyncio.get_running_loop().run_in_executor(
                    store._executor, writer_profile.enable)
            cpu = time.process_time()
            for first in range(warm, len(kept), batch):
                await asyncio.gather(*(one(d) for d in kept[first:first + batch]))
            cpu = time.process_time() - cpu
            if profile is not None:
                profile.disable()
                await asyncio.get_running_loop().run_in_executor(
                    store._executor, writer_profile.disable)
        finally:
            await store.close()
    return cpu / (len(kept) - warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--warm", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    registry = SearchRegistry.load(SHIPPED / TABLE)
    translator = Translator.load(SHIPPED)
    kept = [wire.encode(translator.translate(parse_message(
        TEMPLATE.format(cid=f"C{n}", n=f"P{n}").encode()), datetime.now(UTC)))
        for n in range(args.messages)]
    runs = []
    for _ in range(args.repeat):
        profile = cProfile.Profile() if args.profile is not None else None
        writer = cProfile.Profile() if args.profile is not None else None
        runs.append(asyncio.run(apply_all(registry, kept, args.batch, args.warm, profile,
                                          writer)))
        if profile is not None and writer is not None:
            profile.dump_stats(str(args.profile))
            writer.dump_stats(f"{args.profile}.writer")
        print(f"apply CPU {runs[-1] * 1e6:6.0f} us/msg", flush=True)
    print(f"median of {len(runs)}: {statistics.median(runs) * 1e6:.0f} us/msg "
          f"({args.messages - args.warm} messages, groups of {args.batch}, sealed, "
          "synchronous=full)")


if __name__ == "__main__":
    main()
