"""Encryption at rest benchmark (a benchmark, not a test): what sealing costs the stores.

What is measured, in one process, plaintext (the peer) and sealed alternately, each on a
fresh temporary data dir with `synchronous = normal` (so the disk's fsync, which a shared
machine makes noisy, weighs less than in the end-to-end benchmarks):

1. inbox: `SqliteInbox.accept` of N synthetic ADT^A01 messages (unique control ids),
   concurrently (group commit), then `with_status` reading them all back;
2. FHIR store: `SqliteFhirStore.transact` of N translated ADT^A01 Bundles (20 entries
   each; new patients, concurrently), then N searches by identifier (a blind index when
   sealed) and N reads by id (a body opened when sealed);
3. the primitives: seal + open of one raw message, and one blind index.

Each row is run `--rounds` times (plain, sealed, plain, sealed, ...) and the best of each
is printed with the sealed/plain ratio: the ratio is the figure to read on a noisy machine.

How to run:
    python bench/sealing.py [--messages 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from store_apply import MESSAGE, writes_for

from gateway.fhir.search import TABLE, SearchRegistry
from gateway.mapping.engine import Translator
from gateway.mapping.tables import SHIPPED
from gateway.store.data_keys import parse_keys
from gateway.store.fhir import SearchQuery, TokenMatch, WriteRequest
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.inbox import InboundMessage
from gateway.store.inbox_sqlite import SqliteInbox
from gateway.store.sealing import PLAIN, RowCodec, SealedCodec, inbox_context

ADT = (Path(__file__).resolve().parent.parent / "tests" / "messages" / "adt_a01.hl7")


def sealed_codec() -> SealedCodec:
    ring = parse_keys("bench " + base64.b64encode(os.urandom(32)).decode(), "bench")
    return SealedCodec(ring, "bench")


async def inbox_round(codec: RowCodec, messages: int) -> tuple[float, float]:
    raw = ADT.read_bytes()
    with tempfile.TemporaryDirectory() as directory:
        inbox = await SqliteInbox.open(Path(directory) / "inbox.db", synchronous="normal",
                                       dedup_window=timedelta(days=1), codec=codec)
        try:
            items = [InboundMessage("BENCH", "FAC", f"C{i}", "ADT^A01", "2.5.1", "peer",
                                    raw.replace(b"CTRL-ADT-0001", f"C{i}".encode()),
                                    b"MSH|ack", datetime.now(UTC)) for i in range(messages)]
            start = time.perf_counter()
            await asyncio.gather(*(inbox.accept(m) for m in items))
            accepted = time.perf_counter()
            rows = await inbox.with_status("accepted", limit=messages)
            read = time.perf_counter()
            assert len(rows) == messages
        finally:
            await inbox.close()
    return (accepted - start) / messages, (read - accepted) / messages


async def fhir_round(codec: RowCodec, batches: list[list[WriteRequest]],
                     registry: SearchRegistry) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as directory:
        store = await SqliteFhirStore.open(Path(directory) / "fhir.db", registry.index,
                                           synchronous="normal", codec=codec,
                                           string_groups=registry.string_groups())
        try:
            start = time.perf_counter()
            outcomes = await asyncio.gather(*(store.transact(w) for w in batches))
            written = time.perf_counter()
            for n in range(len(batches)):
                page = await store.search(SearchQuery("Patient", ((TokenMatch(
                    "identifier", None, f"MRN-B{n}"),),)))
                assert len(page.resources) == 1, n
            searched = time.perf_counter()
            ids = [o.stored.id for batch in outcomes for o in batch
                   if o.stored is not None and o.stored.resource_type == "Patient"]
            assert len(ids) == len(batches)
            for resource_id in ids:
                assert await store.read("Patient", resource_id) is not None
            read = time.perf_counter()
        finally:
            await store.close()
    count = len(batches)
    return (written - start) / count, (searched - written) / count, (read - searched) / count


def primitive(codec: SealedCodec, repeats: int = 20_000) -> tuple[float, float]:
    raw = ADT.read_bytes()
    context = inbox_context("raw", "BENCH", "FAC", "C1", "2026-01-01T00:00:00.000000Z")
    start = time.perf_counter()
    for _ in range(repeats):
        codec.open(codec.seal(raw, context), context)
    sealed = time.perf_counter()
    for i in range(repeats):
        codec.blind(f"mrn-{i}", "token")
    blinded = time.perf_counter()
    return (sealed - start) / repeats, (blinded - sealed) / repeats


async def best(rounds: int, run: Callable[[RowCodec], Awaitable[tuple[float, ...]]]
               ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    plain: list[tuple[float, ...]] = []
    sealed: list[tuple[float, ...]] = []
    for _ in range(rounds):
        plain.append(await run(PLAIN))
        sealed.append(await run(sealed_codec()))
    return (tuple(min(r[i] for r in plain) for i in range(len(plain[0]))),
            tuple(min(r[i] for r in sealed) for i in range(len(sealed[0]))))


def row(name: str, plain: float, sealed: float) -> None:
    print(f"{name:<34} {plain * 1e6:>10.1f} {sealed * 1e6:>10.1f} {sealed / plain:>7.2f}")


async def run(messages: int, rounds: int) -> None:
    registry = SearchRegistry.load(SHIPPED / TABLE)
    translator = Translator.load(SHIPPED)
    raw = MESSAGE.read_bytes()
    batches = [writes_for(registry, translator, raw, i) for i in range(messages)]
    print(f"sealing bench: {messages} messages / Bundles of {len(batches[0])} entries, "
          f"best of {rounds} rounds each, synchronous=normal")
    print(f"{'per item (microseconds)':<34} {'plain':>10} {'sealed':>10} {'ratio':>7}")
    inbox_plain, inbox_sealed = await best(rounds, lambda c: inbox_round(c, messages))
    row("inbox accept (group commit)", inbox_plain[0], inbox_sealed[0])
    row("inbox read back (with_status)", inbox_plain[1], inbox_sealed[1])
    fhir_plain, fhir_sealed = await best(
        rounds, lambda c: fhir_round(c, batches, registry))
    row("FHIR apply one ADT Bundle", fhir_plain[0], fhir_sealed[0])
    row("FHIR search by identifier", fhir_plain[1], fhir_sealed[1])
    row("FHIR read by id", fhir_plain[2], fhir_sealed[2])
    seal_open, blind = primitive(sealed_codec())
    print(f"seal + open of one {len(ADT.read_bytes())}-byte message: {seal_open * 1e6:.1f} us; "
          f"one blind index: {blind * 1e6:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.messages, args.rounds))


if __name__ == "__main__":
    main()
