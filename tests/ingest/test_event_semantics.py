"""What each ADT and SIU event does to the stored record, by the Guide's event maps:
A03 finishes the visit, A13 takes it back in progress, A11 cancels it, A12 returns it to
the location before the transfer, A08 updates without touching its status; SIU events
book, cancel and mark no-shows on one Appointment. Real MLLP in, FHIR search out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_mllp_to_store import deliver, get, search

from conftest import RunningGateway, message, with_control_id
from support.builders import hl7, with_fields
from support.fhir import fhir_session, start_fhir_gateway

VISIT = "urn:oid:1.2.3.4.5|VN-900001"
SIU = message("codec_v2.5_siu_s12.hl7")


def adt(event: str, control_id: str, pv1: str = "PV1|1|I|WARD1^101^A^SYNTHHOSP") -> bytes:
    return hl7(
        f"MSH|^~\\&|SYNTHADT|SYNTHHOSP|ISTHMUS|GATEWAY|20260320080000+0100||ADT^{event}|"
        f"{control_id}|P|2.5.1",
        f"EVN|{event}|20260320075900+0100",
        "PID|1||MRN-900001^^^SYNTHHOSP&1.2.3.4.5&ISO^MR||CANARYEVENT^Sam||19700707|M",
        pv1 + "|" * (19 - pv1.count("|")) + "VN-900001^^^SYNTHHOSP&1.2.3.4.5&ISO^VN")


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    running = await start_fhir_gateway(tmp_path / "var")
    yield running
    await running.runner.cleanup()


@pytest.fixture
async def fhir(gateway: RunningGateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with fhir_session(gateway) as session:
        yield session


async def visit(fhir: aiohttp.ClientSession) -> dict[str, Any]:
    [encounter] = await search(fhir, f"Encounter?identifier={VISIT}")
    return encounter


async def active_ward(fhir: aiohttp.ClientSession, encounter: dict[str, Any]) -> list[str]:
    """The names of the Locations the visit is at now (most specific first)."""
    names = []
    for place in encounter["location"]:
        if place.get("status") == "active":
            location = await get(fhir, f"/fhir/{place['location']['reference']}")
            names.append(location.get("name", ""))
    return names


async def test_discharge_cancel_discharge_and_cancel_admit(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, adt("A01", "EV-1"))
    first = await visit(fhir)
    assert first["status"] == "in-progress"
    await deliver(gateway, adt("A03", "EV-2"))
    assert (await visit(fhir))["status"] == "finished"
    await deliver(gateway, adt("A13", "EV-3"))
    assert (await visit(fhir))["status"] == "in-progress"
    await deliver(gateway, adt("A11", "EV-4"))
    cancelled = await visit(fhir)
    assert cancelled["status"] == "cancelled"
    assert cancelled["id"] == first["id"]  # one visit throughout, a version per event
    assert cancelled["meta"]["versionId"] == "4"


async def test_an_update_keeps_the_status_it_does_not_convey(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, adt("A01", "EV-1"))
    await deliver(gateway, adt("A08", "EV-2", pv1="PV1|1|I|WARD1^102^A^SYNTHHOSP"))
    updated = await visit(fhir)
    assert updated["status"] == "in-progress"  # A08's `unknown` does not overwrite it
    assert updated["meta"]["versionId"] == "2"  # the new bed is an update


async def test_cancel_transfer_returns_the_visit_to_the_prior_location(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, adt("A01", "EV-1"))
    before = await active_ward(fhir, await visit(fhir))
    await deliver(gateway, adt("A02", "EV-2", pv1="PV1|1|I|WARD2^201^B^SYNTHHOSP|||"
                                                  "WARD1^101^A^SYNTHHOSP"))
    moved = await active_ward(fhir, await visit(fhir))
    assert moved != before
    # HL7 v2.5 §3.3.12: A12's PV1-3 is the location before the transfer.
    await deliver(gateway, adt("A12", "EV-3", pv1="PV1|1|I|WARD1^101^A^SYNTHHOSP|||"
                                                  "WARD2^201^B^SYNTHHOSP"))
    back = await visit(fhir)
    assert await active_ward(fhir, back) == before
    assert back["status"] == "in-progress"


async def test_siu_events_set_the_status_of_one_appointment(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, SIU)
    [booked] = await search(fhir, "Appointment")
    assert booked["status"] == "booked"
    for event, status in (("S15", "cancelled"), ("S26", "noshow"), ("S14", "booked")):
        changed = with_fields(with_control_id(SIU, f"SIU-{event}"), "MSH",
                              {9: f"SIU^{event}^SIU_S12"})
        await deliver(gateway, changed)
        [appointment] = await search(fhir, "Appointment")
        assert appointment["id"] == booked["id"]
        assert appointment["status"] == status, event
