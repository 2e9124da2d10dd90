"""ADT^A40 (merge patient), ADT^A41 (merge account) and ADT^A47 (change identifier) are
applied to the FHIR store, not only translated: the record merged away stays, inactive
and `replaced-by` the survivor (an Account, which has no link: status inactive, and the
message's Linkage names the pair); every reference to it moves to the survivor; its
identifiers move (A40, A41: kept as `use: old`; A47: the wrong one dropped). Real MLLP in,
FHIR search out; on the embedded store and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_mllp_to_store import deliver, search, statuses

from conftest import MllpPeer, RunningGateway, message, segments, with_control_id
from gateway.app.audit import audit_keys
from gateway.app.state import APPLIER
from support import postgres
from support.audit import settings_for
from support.builders import with_fields
from support.fhir import fhir_session, start_fhir_gateway

AUTHORITY = "SYNTHHOSP&1.2.3.4.5&ISO"
SYSTEM = "urn:oid:1.2.3.4.5"
A01 = message("mapping_adt_a01.hl7")
A40 = message("mapping_adt_a40.hl7")  # PID MRN-400002 survives, MRG MRN-400001 goes
A41 = message("mapping_adt_a41.hl7")  # PID-18 ACCT-NEW-17 survives, MRG-3 ACCT-OLD-17 goes
A47 = message("mapping_adt_a47.hl7")  # MRG MRN-500077 was wrong, PID MRN-500001 is right
ORU = message("identity_oru_r01.hl7")


def admit(mrn: str, visit: str, control_id: str) -> bytes:
    """ADT_A01 for another patient and visit."""
    raw = with_fields(A01, "PID", {3: f"{mrn}^^^{AUTHORITY}^MR"})
    raw = with_fields(raw, "PV1", {19: f"{visit}^^^{AUTHORITY}^VN"})
    return with_control_id(raw, control_id)


def admit_on_account(account: str, visit: str, control_id: str) -> bytes:
    """ADT_A01 for the A41's patient (MRN-500001), a visit charged to `account` (PID-18)."""
    raw = with_fields(A01, "PID", {3: f"MRN-500001^^^{AUTHORITY}^MR",
                                   18: f"{account}^^^{AUTHORITY}^AN"})
    raw = with_fields(raw, "PV1", {19: f"{visit}^^^{AUTHORITY}^VN"})
    return with_control_id(raw, control_id)


def result_for(mrn: str, control_id: str) -> bytes:
    return with_control_id(with_fields(ORU, "PID", {3: f"{mrn}^^^{AUTHORITY}^MR"}),
                           control_id)


@pytest.fixture(params=["sqlite", "postgresql"])
async def gateway(request: pytest.FixtureRequest, tmp_path: Path
                  ) -> AsyncIterator[RunningGateway]:
    if request.param == "sqlite":
        running = await start_fhir_gateway(tmp_path / "var")
        yield running
        await running.runner.cleanup()
        return
    spec = await postgres.new_schema()
    keys = tmp_path / "keys-home"
    audit_keys(settings_for(keys), create=True)  # a PostgreSQL deployment makes none
    try:
        running = await start_fhir_gateway(tmp_path / "var", **{
            "store.backend": "postgresql", "store.url": spec.url,
            "store.schema": spec.schema,
            "audit.key_file": keys / "keys" / "audit-data.keys",
            "audit.signing_key_file": keys / "keys" / "audit-signing.pem"})
        yield running
        await running.runner.cleanup()
    finally:
        await postgres.drop_schema(spec)


@pytest.fixture
async def fhir(gateway: RunningGateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with fhir_session(gateway) as session:
        yield session


async def patient(fhir: aiohttp.ClientSession, mrn: str) -> dict[str, Any]:
    [found] = await search(fhir, f"Patient?identifier={SYSTEM}|{mrn}")
    return found


async def test_a40_moves_references_and_links_the_two_records(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, admit("MRN-400001", "VN-400001", "M-1"),
                  result_for("MRN-400001", "M-2"), admit("MRN-400002", "VN-400002", "M-3"))
    retired = await patient(fhir, "MRN-400001")
    survivor = await patient(fhir, "MRN-400002")
    assert len(await search(fhir, f"Observation?subject=Patient/{retired['id']}")) == 4

    await deliver(gateway, A40)
    assert await statuses(gateway) == [(f"M-{n}", "applied", "") for n in (1, 2, 3)] + [
        ("CTRL-A40-0001", "applied", "")]
    [gone] = await search(fhir, f"Patient?_id={retired['id']}")
    assert gone["active"] is False
    assert gone["link"] == [{"other": {"reference": f"Patient/{survivor['id']}"},
                             "type": "replaced-by"}]
    assert gone["name"][0]["family"] == "CANARYRESULT"  # as last sent: its content stays
    assert "identifier" not in gone
    kept = await patient(fhir, "MRN-400002")
    assert kept["id"] == survivor["id"]
    assert {"other": {"reference": f"Patient/{retired['id']}"}, "type": "replaces"} in \
        kept["link"]
    # The old identifier now finds the survivor, and only it.
    assert (await patient(fhir, "MRN-400001"))["id"] == survivor["id"]
    assert {"system": SYSTEM, "value": "MRN-400001", "use": "old"}.items() <= next(
        i for i in kept["identifier"] if i["value"] == "MRN-400001").items()
    # Every reference moved: the visits, results, allergies, conditions.
    for query in ("Observation?subject", "Encounter?subject", "AllergyIntolerance?patient",
                  "Condition?subject"):
        assert await search(fhir, f"{query}=Patient/{retired['id']}") == [], query
    assert len(await search(fhir, f"Observation?subject=Patient/{survivor['id']}")) == 4
    # its two visits (the result named one) and the survivor's own
    assert len(await search(fhir, f"Encounter?subject=Patient/{survivor['id']}")) == 3


async def test_after_a_merge_later_messages_land_on_the_survivor_and_keep_the_links(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, admit("MRN-400001", "VN-400001", "M-1"),
                  admit("MRN-400002", "VN-400002", "M-2"), A40)
    survivor = await patient(fhir, "MRN-400002")
    # A late result still sent under the old number, then an update of the survivor.
    await deliver(gateway, result_for("MRN-400001", "M-3"),
                  admit("MRN-400002", "VN-400002", "M-4"))
    assert len(await search(fhir, f"Observation?subject=Patient/{survivor['id']}")) == 4
    kept = await patient(fhir, "MRN-400002")
    assert [link["type"] for link in kept["link"]] == ["replaces"]
    assert (await patient(fhir, "MRN-400001"))["id"] == survivor["id"]
    assert len(await search(fhir, "Patient")) == 2
    assert len(await search(fhir, "Patient?active=false")) == 1


async def test_a_merge_resent_changes_nothing_more(gateway: RunningGateway,
                                                   fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, admit("MRN-400001", "VN-400001", "M-1"),
                  admit("MRN-400002", "VN-400002", "M-2"), A40)
    before = await patient(fhir, "MRN-400002")
    await deliver(gateway, with_control_id(A40, "CTRL-A40-0002"))
    after = await patient(fhir, "MRN-400002")
    assert after["meta"]["versionId"] == before["meta"]["versionId"]
    assert len(await search(fhir, "Patient")) == 2


def merge_into(kept: str, gone: str) -> bytes:
    """The A40 merging the record under MRN `gone` into the one under `kept`."""
    merge = with_fields(A40, "PID", {3: f"{kept}^^^{AUTHORITY}^MR"})
    return with_fields(merge, "MRG", {1: f"{gone}^^^{AUTHORITY}^MR"})


async def pipelined(port: int, sent: list[bytes], timeout: float) -> list[str]:
    """Send every message down one connection before reading any ACK; the ACK codes."""
    peer = await MllpPeer.open(port)
    try:
        for raw in sent:
            await peer.send(raw)
        return [segments(await peer.reply(timeout=timeout))["MSA"][0][1] for _ in sent]
    finally:
        await peer.close()


async def test_merges_sent_without_waiting_for_acks_land_after_their_admits(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    # Sent down one connection before any ACK is read, the messages are committed close
    # together and applied as one batch: on PostgreSQL each message is a transaction of
    # its own, and these ran at once (an A40 before its survivor's admit, or two of them
    # deadlocked on their records' locks and one was left for the sweep).
    pairs = [(f"MRN-4100{n}1", f"MRN-4100{n}2") for n in range(3)]
    sent: list[bytes] = []
    for n, (gone, kept) in enumerate(pairs):
        sent += [admit(gone, f"VN-{gone}", f"M-{n}-1"), admit(kept, f"VN-{kept}", f"M-{n}-2"),
                 with_control_id(merge_into(kept, gone), f"M-{n}-3")]
    codes = await pipelined(gateway.mllp_port, sent, timeout=10)
    assert set(codes) <= {"AA", "CA"}, codes
    await gateway.app[APPLIER].drain()
    assert [s for _, s, _ in await statuses(gateway)] == ["applied"] * len(sent)
    before = {kept: (await patient(fhir, kept))["meta"]["versionId"] for _, kept in pairs}
    # Each A40 was applied last of its three: sent again, it finds nothing to change.
    await deliver(gateway, *(with_control_id(raw, f"AGAIN-{n}")
                             for n, raw in enumerate(sent[2::3])))
    assert {kept: (await patient(fhir, kept))["meta"]["versionId"]
            for _, kept in pairs} == before
    assert len(await search(fhir, "Patient?active=false")) == len(pairs)


async def test_a40_for_a_record_the_store_never_held_still_makes_the_survivor(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, A40)
    [only] = await search(fhir, "Patient")
    assert only["identifier"][0]["value"] == "MRN-400002"
    assert "link" not in only
    assert await statuses(gateway) == [("CTRL-A40-0001", "applied", "")]


async def test_a47_changes_the_identifier_and_drops_the_wrong_one(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, admit("MRN-500077", "VN-500077", "M-1"))
    wrong = await patient(fhir, "MRN-500077")
    await deliver(gateway, A47)
    right = await patient(fhir, "MRN-500001")
    assert await search(fhir, f"Patient?identifier={SYSTEM}|MRN-500077") == []
    [encounter] = await search(fhir, f"Encounter?subject=Patient/{right['id']}")
    assert encounter["identifier"][0]["value"] == "VN-500077"
    [gone] = await search(fhir, f"Patient?_id={wrong['id']}")
    assert gone["active"] is False
    assert gone["link"][0]["type"] == "replaced-by"


async def account(fhir: aiohttp.ClientSession, number: str) -> dict[str, Any]:
    [found] = await search(fhir, f"Account?identifier={SYSTEM}|{number}")
    return found


async def test_a41_moves_the_visits_to_the_surviving_account(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, admit_on_account("ACCT-OLD-17", "VN-410001", "M-1"),
                  admit_on_account("ACCT-OLD-17", "VN-410002", "M-2"),
                  admit_on_account("ACCT-NEW-17", "VN-410003", "M-3"))
    retired = await account(fhir, "ACCT-OLD-17")
    survivor = await account(fhir, "ACCT-NEW-17")
    assert len(await search(fhir, f"Encounter?account=Account/{retired['id']}")) == 2

    await deliver(gateway, A41)
    assert (await statuses(gateway))[-1] == ("CTRL-A41-0001", "applied", "")
    # The visits charged to the prior account now are the survivor's, with its own.
    assert await search(fhir, f"Encounter?account=Account/{retired['id']}") == []
    moved = await search(fhir, f"Encounter?account=Account/{survivor['id']}")
    assert sorted(e["identifier"][0]["value"] for e in moved) == [
        "VN-410001", "VN-410002", "VN-410003"]
    # The prior account is kept, inactive (R4 Account has no link), without its number.
    [gone] = await search(fhir, f"Account?_id={retired['id']}")
    assert gone["status"] == "inactive"
    assert "identifier" not in gone
    # Its number finds the survivor, as an old identifier, and only it.
    kept = await account(fhir, "ACCT-OLD-17")
    assert kept["id"] == survivor["id"]
    assert kept["status"] == "active"
    assert {"system": SYSTEM, "value": "ACCT-OLD-17", "use": "old"}.items() <= next(
        i for i in kept["identifier"] if i["value"] == "ACCT-OLD-17").items()
    assert len(await search(fhir, "Account")) == 2
    # The Linkage records the pair: the survivor by reference, the prior one by number.
    [linkage] = await search(fhir, "Linkage")
    assert {"resource": {"reference": f"Account/{survivor['id']}"}, "type": "source"} in \
        linkage["item"]
    assert {"resource": {"type": "Account",
                         "identifier": {"system": SYSTEM, "value": "ACCT-OLD-17"}},
            "type": "historical"} in linkage["item"]
    assert await search(fhir, f"Linkage?item=Account/{survivor['id']}") == [linkage]


async def test_an_a41_resent_changes_nothing_more(gateway: RunningGateway,
                                                  fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, admit_on_account("ACCT-OLD-17", "VN-410001", "M-1"), A41)
    before = {a["id"]: a["meta"]["versionId"] for a in await search(fhir, "Account")}
    [linkage] = await search(fhir, "Linkage")
    [visit] = await search(fhir, "Encounter?identifier=" + SYSTEM + "|VN-410001")
    await deliver(gateway, A41, with_control_id(A41, "CTRL-A41-0002"))
    assert {a["id"]: a["meta"]["versionId"]
            for a in await search(fhir, "Account")} == before
    assert await search(fhir, "Linkage") == [linkage]
    assert await search(fhir, "Encounter?identifier=" + SYSTEM + "|VN-410001") == [visit]
    assert [s for _, s, _ in await statuses(gateway)] == ["applied"] * 3


async def test_a41_for_an_account_the_store_never_held_only_adds_the_survivor(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, A41)
    [only] = await search(fhir, "Account")
    assert [i["value"] for i in only["identifier"]] == ["ACCT-NEW-17"]
    assert only["status"] == "active"
    assert await statuses(gateway) == [("CTRL-A41-0001", "applied", "")]


async def test_with_two_apply_workers_a_merge_waits_for_the_admit_in_the_other_share(
        tmp_path: Path) -> None:
    # Each apply worker takes the patients of its share, by PID-3: this A40 goes to the
    # survivor's worker (MRN-410002: share 0), the admit of the record it merges away to
    # the other (MRN-410001: share 1), kept busy with other patients of share 1. Applied
    # first, the merge found nothing and the admit made a record no merge retired.
    gateway = await start_fhir_gateway(tmp_path / "var", **{"processes.workers": 2})
    try:
        gone, kept = "MRN-410001", "MRN-410002"
        busy = [admit(f"MRN-4100{n % 4 + 2}1", f"VN-B{n % 4}", f"B-{n}") for n in range(400)]
        sent = [*busy, admit(gone, "VN-G", "G-1"), admit(kept, "VN-K", "K-1"),
                with_control_id(merge_into(kept, gone), "X-1")]
        codes = await pipelined(gateway.mllp_port, sent, timeout=30)
        assert set(codes) <= {"AA", "CA"}, codes
        await gateway.app[APPLIER].drain()
        async with fhir_session(gateway) as fhir:
            survivor = await patient(fhir, kept)
            assert (await patient(fhir, gone))["id"] == survivor["id"]
            [retired] = await search(fhir, "Patient?active=false")
            assert retired["link"] == [{"other": {"reference": f"Patient/{survivor['id']}"},
                                        "type": "replaced-by"}]
    finally:
        await gateway.runner.cleanup()
