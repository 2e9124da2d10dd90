"""The local store's applier: a backlog past `max_held` keeps only inbox ids, and every
message is still applied once, in inbox order (later messages about a patient win)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import orjson

from conftest import message, with_control_id
from gateway.hl7.errors import Hl7Error
from gateway.hl7.message import parse_message
from gateway.ingest.applier import LocalApplier
from gateway.store.fhir import SearchQuery, TokenMatch
from gateway.store.inbox import ACCEPTED, APPLIED, TRANSLATED, InboundMessage
from support.apply import open_apply_parts


def with_family(raw: bytes, family: bytes) -> bytes:
    """PID-5.1 replaced: successive messages about one patient, told apart by name."""
    lines = raw.split(b"\r")
    for i, line in enumerate(lines):
        if line.startswith(b"PID|"):
            fields = line.split(b"|")
            fields[5] = family + b"^" + fields[5].partition(b"^")[2]
            lines[i] = b"|".join(fields)
    return b"\r".join(lines)


async def test_a_backlog_beyond_what_is_held_is_applied_once_and_in_order(
        tmp_path: Path) -> None:
    registry, translator, inbox, store = await open_apply_parts(tmp_path)
    applier = LocalApplier(store, registry, inbox, translator, max_held=1)
    try:
        families = [b"FIRSTNAME", b"SECONDNAME", b"THIRDNAME", b"LASTNAME"]
        pending = []
        for n, family in enumerate(families):
            raw = with_family(with_control_id(message("mapping_adt_a01.hl7"),
                                              f"HELD-{n}"), family)
            now = datetime.now(UTC)
            stored = await inbox.accept(InboundMessage(
                "SYNTHADT", "SYNTHHOSP", f"HELD-{n}", "ADT^A01", "2.5.1", "test", raw,
                b"ACK", now, status=ACCEPTED))  # not for the start-up sweep
            pending.append((stored.inbox_id, translator.translate(parse_message(raw), now)))
        applier.start()
        await applier.drain()
        # Queued as live messages arrive: only the first is held in memory, the rest are
        # made again from the inbox when their turn comes.
        for inbox_id, translation in pending:
            applier.submit(inbox_id, translation)
        assert sum(t is None for _, t, _ in applier._queue) == len(families) - 1
        await applier.drain()
        page = await store.search(SearchQuery("Patient", ((TokenMatch(
            "identifier", None, "MRN-300001"),),)))
        [patient] = page.resources
        assert orjson.loads(patient.body)["name"][0]["family"] == "LASTNAME"
        assert patient.version == len(families)  # one version per message, no more
        assert {e.status for e in await inbox.list(10)} == {APPLIED}
    finally:
        await applier.close()
        await store.close()
        await inbox.close()


async def test_a_batch_that_fails_leaves_its_rows_for_the_sweep_and_the_applier_goes_on(
        tmp_path: Path) -> None:
    registry, translator, inbox, store = await open_apply_parts(tmp_path)
    applier = LocalApplier(store, registry, inbox, translator)
    try:
        applier.start()
        await applier.drain()
        stored = []
        for n, family in enumerate([b"FIRSTNAME", b"LASTNAME"]):
            raw = with_family(with_control_id(message("mapping_adt_a01.hl7"),
                                              f"FAIL-{n}"), family)
            now = datetime.now(UTC)
            row = await inbox.accept(InboundMessage(
                "SYNTHADT", "SYNTHHOSP", f"FAIL-{n}", "ADT^A01", "2.5.1", "test", raw,
                b"ACK", now, status=TRANSLATED))
            stored.append((row.inbox_id, translator.translate(parse_message(raw), now)))

        def refused(problem: Hl7Error | None) -> None:
            raise RuntimeError("the application ACK could not be sent")

        # The first batch fails after its write (telling the outcome raises): it stays
        # `translated`, for the sweep; the applier must still apply the next one.
        applier.submit(*stored[0], refused)
        await asyncio.wait_for(applier.drain(), 20)
        applier.submit(*stored[1])
        await asyncio.wait_for(applier.drain(), 20)
        page = await store.search(SearchQuery("Patient", ((TokenMatch(
            "identifier", None, "MRN-300001"),),)))
        [patient] = page.resources
        assert orjson.loads(patient.body)["name"][0]["family"] == "LASTNAME"
        statuses = {e.control_id: e.status for e in await inbox.list(10)}
        assert statuses == {"FAIL-0": TRANSLATED, "FAIL-1": APPLIED}
    finally:
        await applier.close()
        await store.close()
        await inbox.close()
