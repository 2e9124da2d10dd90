"""FHIR store apply benchmark (a benchmark, not a test).

What is measured: how long the embedded FHIR store takes to apply one translated HL7
ADT^A01 (a 20-entry transaction Bundle: Patient, Encounter, Practitioners, Locations,
Provenance...), straight through `SqliteFhirStore.transact`, for new patients one at a
time and concurrently (group commit), and for unchanged resends (no new versions), with
`synchronous` normal and full. Each message has its own MRN and control id.

With `--sealed` the store seals bodies and blinds index values as a new data dir does by
default (encryption at rest), and the CPU per message and the time the write transaction
held the lock (`write_seconds` of each group, summed) are printed too.

With `--groups` it measures only what the apply worker's store does with a message of
`apply_lag.py` (a new patient each, ~10 entries): after 200 warm-up messages, the rest in
group commits of 64 (as the worker's batches), synchronous=full, printing the process's
CPU per message (the writer thread's SQLite work and its Python).

How to run:
    python bench/store_apply.py [--messages 400] [--sealed]
    python bench/store_apply.py --groups --sealed --messages 1500
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.fhir.bundle import to_bundle
from gateway.fhir.search import TABLE, SearchRegistry
from gateway.hl7.message import parse_message
from gateway.ingest.applier import bundle_writes
from gateway.mapping.engine import Translator
from gateway.mapping.tables import SHIPPED
from gateway.store.fhir import WriteRequest
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.sealing import PLAIN, DataKey, KeyRing, RowCodec, SealedCodec

MESSAGE = Path(__file__).resolve().parent.parent / "tests" / "messages" / "mapping_adt_a01.hl7"


def writes_for(registry: SearchRegistry, translator: Translator, raw: bytes,
               n: int) -> list[WriteRequest]:
    message = raw.replace(b"MRN-300001", f"MRN-B{n}".encode()).replace(
        b"CTRL-A01-0001", f"C{n}".encode())
    translation = translator.translate(parse_message(message), datetime.now(UTC))
    return bundle_writes(registry, to_bundle(translation))


class _LockHeld:
    """Applies calls and sums each group commit's write transaction (the lock held)."""

    def __init__(self, store: SqliteFhirStore) -> None:
        self.store = store
        self.seconds = 0.0
        self._groups = store.groups_committed

    async def apply(self, writes: list[WriteRequest]) -> None:
        await self.store.transact(writes)
        if self.store.groups_committed != self._groups:
            self._groups = self.store.groups_committed
            self.seconds += self.store.write_seconds


async def run(messages: int, sealed: bool) -> None:
    registry = SearchRegistry.load(SHIPPED / TABLE)
    translator = Translator.load(SHIPPED)
    raw = MESSAGE.read_bytes()
    batches = [writes_for(registry, translator, raw, i) for i in range(messages)]
    half = messages // 2
    print(f"store apply bench: {messages} ADT^A01 messages, "
          f"{len(batches[0])} entries each, {'sealed' if sealed else 'plain'}")
    codec: RowCodec = PLAIN
    if sealed:
        codec = SealedCodec(KeyRing((DataKey.from_secret("bench", b"k" * 32),)), "bench")
    for synchronous in ("normal", "full"):
        with tempfile.TemporaryDirectory() as directory:
            store = await SqliteFhirStore.open(Path(directory) / "fhir.db", registry.index,
                                               synchronous=synchronous,  # type: ignore[arg-type]
                                               codec=codec,
                                               string_groups=registry.string_groups())
            lock = _LockHeld(store)
            apply = lock.apply
            try:
                cpu = time.process_time()
                start = time.perf_counter()
                for writes in batches[:half]:
                    await apply(writes)
                serial = time.perf_counter()
                await asyncio.gather(*(apply(w) for w in batches[half:]))
                concurrent = time.perf_counter()
                new_cpu = time.process_time() - cpu
                new_held = lock.seconds
                await asyncio.gather(*(apply(w) for w in batches[:half]))
                resent = time.perf_counter()
            finally:
                await store.close()
        print(f"synchronous={synchronous}: new one at a time "
              f"{(serial - start) / half * 1e3:.2f} ms/msg, new concurrent "
              f"{(concurrent - serial) / (messages - half) * 1e3:.2f} ms/msg, unchanged "
              f"resend concurrent {(resent - concurrent) / half * 1e3:.2f} ms/msg; new: CPU "
              f"{new_cpu / messages * 1e3:.2f} ms/msg, write lock held "
              f"{new_held / messages * 1e3:.2f} ms/msg")


async def run_groups(messages: int, sealed: bool) -> None:
    from apply_lag import TEMPLATE  # bench/ is this script's first path entry

    registry = SearchRegistry.load(SHIPPED / TABLE)
    translator = Translator.load(SHIPPED)
    batches = [bundle_writes(registry, to_bundle(translator.translate(parse_message(
        TEMPLATE.format(cid=f"G{n}", n=f"G{n}").encode()), datetime.now(UTC))))
        for n in range(messages)]
    codec: RowCodec = PLAIN
    if sealed:
        codec = SealedCodec(KeyRing((DataKey.from_secret("bench", b"k" * 32),)), "bench")
    warm = min(200, messages // 2)
    with tempfile.TemporaryDirectory() as directory:
        store = await SqliteFhirStore.open(Path(directory) / "fhir.db", registry.index,
                                           synchronous="full", codec=codec,
                                           string_groups=registry.string_groups())
        try:
            await asyncio.gather(*(store.transact(w) for w in batches[:warm]))
            cpu, start = time.process_time(), time.perf_counter()
            for first in range(warm, messages, 64):
                await asyncio.gather(*(store.transact(w) for w in batches[first:first + 64]))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - start
        finally:
            await store.close()
    measured = messages - warm
    print(f"groups of 64, {measured} apply_lag ADT^A01 messages, "
          f"{'sealed' if sealed else 'plain'}: CPU {cpu / measured * 1e6:.0f} us/msg, "
          f"wall {wall / measured * 1e6:.0f} us/msg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--sealed", action="store_true",
                        help="seal bodies and blind index values (encryption at rest)")
    parser.add_argument("--groups", action="store_true",
                        help="only the apply worker's case: apply_lag.py's message, group "
                             "commits of 64, CPU per message")
    args = parser.parse_args()
    asyncio.run((run_groups if args.groups else run)(args.messages, args.sealed))


if __name__ == "__main__":
    main()
