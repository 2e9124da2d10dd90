"""The apply workers' loop (`InboxFollower`), in this process on real files: rows marked
`translated` are applied in inbox order and reported; two workers split the patients
between them and together apply everything once; a row whose apply committed before a
crash (its Provenance is in the store) is marked, not applied again; a translation kept
for a row (made for its ACK) is the one applied, and one that does not read (cut short,
changed) is translated again from the row; a message of many resources (its writes made
on a thread) is applied whole."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson

from conftest import message, with_control_id
from gateway.canonical import wire
from gateway.hl7.message import parse_message
from gateway.ingest.prepare import message_key
from gateway.ingest.replay import translate
from gateway.ingest.worker import InboxFollower, share_of
from gateway.store.fhir import SearchQuery, TokenMatch
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.inbox import APPLIED, TRANSLATED, InboundMessage
from gateway.store.inbox_sqlite import SqliteInbox
from support.apply import open_apply_parts
from support.builders import with_fields
from support.wait import eventually

ADT = message("mapping_adt_a01.hl7")


def adt(patient: int, update: int) -> bytes:
    raw = with_control_id(ADT, f"F-{patient}-{update}")
    return with_fields(raw, "PID", {3: f"MRN-F{patient:03d}^^^SYNTHHOSP^MR",
                                    5: f"FAMILY{update}^Jane"})


def many_results(observations: int) -> bytes:
    """An ORU^R01 with this many OBX: a translation past the worker's 500 resources."""
    head = ("MSH|^~\\&|SYNTHLAB|SYNTHHOSP|ISTHMUS|GATEWAY|20261126083000||ORU^R01^ORU_R01|"
            "MANY-1|P|2.5.1\r"
            "PID|1||MRN-MANY01^^^SYNTHHOSP^MR||MANYFAMILY^Jane||19800102|F\r"
            "OBR|1|PL-MANY|FL-MANY|24331-1^Lipid panel^LN|||20261126080000\r")
    return (head + "".join(f"OBX|{n}|NM|2093-3^Cholesterol^LN|{n}|180|mg/dL|<200|N|||F\r"
                           for n in range(1, observations + 1))).encode()


async def commit(inbox: SqliteInbox, raw: bytes, control_id: str,
                 message_type: str = "ADT^A01") -> int:
    stored = await inbox.accept(InboundMessage(
        "SYNTHADT", "SYNTHHOSP", control_id, message_type, "2.5.1", "test", raw, b"ACK",
        datetime.now(UTC), status=TRANSLATED))
    return stored.inbox_id


async def families(store: SqliteFhirStore, patients: int) -> dict[int, str]:
    found = {}
    for patient in range(patients):
        page = await store.search(SearchQuery("Patient", ((TokenMatch(
            "identifier", None, f"MRN-F{patient:03d}"),),)))
        for resource in page.resources:
            found[patient] = orjson.loads(resource.body)["name"][0]["family"]
    return found


async def test_followers_split_the_patients_and_apply_each_ones_messages_in_order(
        tmp_path: Path) -> None:
    registry, translator, inbox, store = await open_apply_parts(tmp_path)
    reports: list[list[tuple[int, str]]] = [[], []]

    def reporter(share: int) -> Callable[[Sequence[tuple[int, str]]], None]:
        def report(done: Sequence[tuple[int, str]]) -> None:
            reports[share].extend(done)
        return report

    followers = [InboxFollower(store, registry, inbox, translator, reporter(share),
                               share=share, shares=2, max_batch=3) for share in (0, 1)]
    tasks = [asyncio.create_task(f.follow()) for f in followers]
    try:
        patients, updates = 6, 3
        ids = {}
        for update in range(updates):
            for patient in range(patients):
                ids[(patient, update)] = await commit(inbox, adt(patient, update),
                                                      f"F-{patient}-{update}")
            for follower in followers:
                follower.wake()
        total = patients * updates
        await eventually(lambda: len(reports[0]) + len(reports[1]) == total, timeout=60)
        assert all(problem == "" for r in reports for _, problem in r)
        # Each row reported by exactly one worker: the one whose share holds its patient.
        for share, done in enumerate(reports):
            for row_id, _ in done:
                patient = next(p for (p, _), i in ids.items() if i == row_id)
                key_share = share_of(_patient_key(patient), 2)
                assert key_share == share
        assert {e.status for e in await inbox.list(100)} == {APPLIED}
        assert await families(store, patients) == {
            p: f"FAMILY{updates - 1}" for p in range(patients)}
    finally:
        for follower in followers:
            follower.stop()
        await asyncio.gather(*tasks)
        await store.close()
        await inbox.close()


def _patient_key(patient: int) -> str:
    from gateway.ingest.replay import patient_key

    return patient_key(parse_message(adt(patient, 0)))


async def test_a_row_applied_before_a_crash_but_not_marked_is_not_applied_again(
        tmp_path: Path) -> None:
    registry, translator, inbox, store = await open_apply_parts(tmp_path)
    done: list[tuple[int, str]] = []
    try:
        first = InboxFollower(store, registry, inbox, translator, done.extend)
        running = asyncio.create_task(first.follow())
        row = await commit(inbox, adt(1, 0), "F-1-0")
        await commit(inbox, adt(1, 1), "F-1-1")
        first.wake()
        await eventually(lambda: len(done) == 2, timeout=30)
        first.stop()
        await running
        # The crash: the store committed the first, the inbox mark did not. Applying it
        # again would put its older name back over the second's.
        await inbox.set_statuses([(row, TRANSLATED, "")])
        done.clear()
        second = InboxFollower(store, registry, inbox, translator, done.extend)
        running = asyncio.create_task(second.follow())
        await eventually(lambda: len(done) == 1, timeout=30)
        second.stop()
        await running
        assert done == [(row, "")]
        page = await store.search(SearchQuery("Patient", ((TokenMatch(
            "identifier", None, "MRN-F001"),),)))
        [patient] = page.resources
        assert orjson.loads(patient.body)["name"][0]["family"] == "FAMILY1"
        assert patient.version == 2  # one version per message, none more
        assert {e.status for e in await inbox.list(10)} == {APPLIED}
    finally:
        await store.close()
        await inbox.close()


async def test_a_translation_kept_for_its_row_is_applied_instead_of_a_new_one(
        tmp_path: Path) -> None:
    registry, translator, inbox, store = await open_apply_parts(tmp_path)
    done: list[tuple[int, str]] = []
    follower = InboxFollower(store, registry, inbox, translator, done.extend)
    raw = adt(1, 0)
    # Made "for the ACK" from other bytes than the row's (another family name): what the
    # store ends up with says which translation was applied.
    made = translate(translator, parse_message(adt(1, 7)), datetime.now(UTC)).translation
    assert made is not None
    follower.keep(message_key(raw), wire.encode(made))
    task = asyncio.create_task(follower.follow())
    try:
        await commit(inbox, raw, "F-1-0")
        follower.wake()
        await eventually(lambda: len(done) == 1, timeout=60)
        assert await families(store, 2) == {1: "FAMILY7"}
        assert follower.translated_again == 0
        # A row with nothing kept is translated from its bytes.
        await commit(inbox, adt(0, 2), "F-0-2")
        follower.wake()
        await eventually(lambda: len(done) == 2, timeout=60)
        assert await families(store, 2) == {0: "FAMILY2", 1: "FAMILY7"}
        assert follower.translated_again == 1
    finally:
        follower.stop()
        await task
        await store.close()
        await inbox.close()


async def test_a_kept_translation_that_does_not_read_is_translated_again(
        tmp_path: Path) -> None:
    registry, translator, inbox, store = await open_apply_parts(tmp_path)
    done: list[tuple[int, str]] = []
    # No idle sweep in the test's time: a batch that failed would not be read again.
    follower = InboxFollower(store, registry, inbox, translator, done.extend,
                             sweep_interval=3600)
    made = translate(translator, parse_message(adt(1, 7)), datetime.now(UTC)).translation
    assert made is not None
    encoded = wire.encode(made)
    cut_short, changed = adt(1, 0), adt(2, 0)
    follower.keep(message_key(cut_short), encoded[:len(encoded) // 2])
    follower.keep(message_key(changed), encoded[:40] + bytes([encoded[40] ^ 0xFF])
                  + encoded[41:])
    task = asyncio.create_task(follower.follow())
    try:
        first = await commit(inbox, cut_short, "F-1-0")
        second = await commit(inbox, changed, "F-2-0")
        follower.wake()
        await eventually(lambda: len(done) == 2, timeout=60)
        # Both applied from their own bytes (FAMILY0), not from what was kept (FAMILY7).
        assert done == [(first, ""), (second, "")]
        assert await families(store, 3) == {1: "FAMILY0", 2: "FAMILY0"}
        assert follower.translated_again == 2
        assert {e.status for e in await inbox.list(10)} == {APPLIED}
    finally:
        follower.stop()
        await task
        await store.close()
        await inbox.close()


async def test_a_message_of_many_resources_is_applied_whole(tmp_path: Path) -> None:
    registry, translator, inbox, store = await open_apply_parts(tmp_path)
    done: list[tuple[int, str]] = []
    follower = InboxFollower(store, registry, inbox, translator, done.extend)
    raw = many_results(520)
    translation = translator.translate(parse_message(raw), datetime.now(UTC))
    assert len(translation.resources) > 500  # the worker's heavy path
    task = asyncio.create_task(follower.follow())
    try:
        row = await commit(inbox, raw, "MANY-1", "ORU^R01")
        follower.wake()
        await eventually(lambda: len(done) == 1, timeout=120)
        assert done == [(row, "")]
        made = Counter(r.resource_type for r in translation.resources)
        assert made["Observation"] == 520
        for resource_type, count in (made + Counter(["Provenance"])).items():
            page = await store.search(SearchQuery(resource_type))
            assert len(page.resources) == count, resource_type
    finally:
        follower.stop()
        await task
        await store.close()
        await inbox.close()
