"""The local store's applier: a backlog past `max_held` keeps only inbox ids, and every
message is still applied once, in inbox order (later messages about a patient win)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson

from conftest import message, with_control_id
from gateway.hl7.message import parse_message
from gateway.ingest.applier import LocalApplier
from gateway.store.fhir import SearchQuery, TokenMatch
from gateway.store.inbox import ACCEPTED, APPLIED, InboundMessage
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
