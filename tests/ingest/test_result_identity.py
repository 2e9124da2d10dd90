"""A result is one record however often it is sent: an ORU resent under a new MSH-10, or
corrected (OBX-11 C), updates the Observations it made (same id, a new version) instead of
adding a second set beside them; orders and reports keep their placer/filler identity.
Real MLLP into the embedded store, checked by FHIR search."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_mllp_to_store import deliver, get, search

from conftest import RunningGateway, message, with_control_id
from gateway.app.state import APPLIER
from support.builders import with_fields
from support.fhir import fhir_session, start_fhir_gateway

ORU = message("identity_oru_r01.hl7")
GLUCOSE = "http://loinc.org|2345-7"
PATHOLOGY = "http://loinc.org|11526-1"


def obx(raw: bytes, set_id: int, values: dict[int, str]) -> bytes:
    """`raw` with fields of the OBX whose OBX-1 is `set_id` replaced."""
    lines = raw.split(b"\r")
    index = next(i for i, line in enumerate(lines)
                 if line.startswith(b"OBX|%d|" % set_id))
    rest = b"\r".join(lines[index:])
    return b"\r".join(lines[:index]) + b"\r" + with_fields(rest, "OBX", values)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    running = await start_fhir_gateway(tmp_path / "var")
    yield running
    await running.runner.cleanup()


@pytest.fixture
async def fhir(gateway: RunningGateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with fhir_session(gateway) as session:
        yield session


async def test_a_resend_under_a_new_control_id_leaves_one_glucose_result(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, ORU)
    [first] = await search(fhir, f"Observation?code={GLUCOSE}")
    await deliver(gateway, with_control_id(ORU, "IDN-0002"))
    [again] = await search(fhir, f"Observation?code={GLUCOSE}")
    assert again["id"] == first["id"]
    assert again["meta"]["versionId"] == "1"  # the same content: no new version
    assert len(await search(fhir, "Observation?_count=50")) == 4
    assert len(await search(fhir, "DiagnosticReport")) == 1
    assert len(await search(fhir, "ServiceRequest")) == 1


async def test_a_correction_updates_the_result_in_place_with_a_new_version(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, ORU)
    [preliminary] = await search(fhir, f"Observation?code={GLUCOSE}")
    assert preliminary["status"] == "preliminary"
    corrected = obx(with_control_id(ORU, "IDN-0003"), 1, {5: "98", 8: "N", 11: "C"})
    await deliver(gateway, corrected)
    [result] = await search(fhir, f"Observation?code={GLUCOSE}")
    assert result["id"] == preliminary["id"]
    assert result["status"] == "corrected"
    assert result["valueQuantity"]["value"] == 98
    assert result["meta"]["versionId"] == "2"
    history = await get(fhir, f"/fhir/Observation/{result['id']}/_history")
    assert [e["resource"]["status"] for e in history["entry"]] == ["corrected", "preliminary"]
    [report] = await search(fhir, "DiagnosticReport")
    assert f"Observation/{result['id']}" in [r["reference"] for r in report["result"]]


async def test_text_lines_under_one_code_stay_apart_and_keep_their_records(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, ORU)
    lines = await search(fhir, f"Observation?code={PATHOLOGY}")
    assert sorted(o["valueString"] for o in lines) == ["First line of the report",
                                                       "Second line of the report"]
    await deliver(gateway, with_control_id(ORU, "IDN-0004"))
    again = await search(fhir, f"Observation?code={PATHOLOGY}")
    assert sorted(o["id"] for o in again) == sorted(o["id"] for o in lines)


async def test_another_order_is_another_result(gateway: RunningGateway,
                                               fhir: aiohttp.ClientSession) -> None:
    await deliver(gateway, ORU)
    other = with_fields(with_fields(with_control_id(ORU, "IDN-0005"), "ORC",
                                    {2: "PL-8002^WardApp", 3: "FL-8002^LabSys"}),
                        "OBR", {2: "PL-8002^WardApp", 3: "FL-8002^LabSys"})
    await deliver(gateway, other)
    assert len(await search(fhir, f"Observation?code={GLUCOSE}")) == 2
    assert len(await search(fhir, "DiagnosticReport")) == 2


async def test_an_order_then_its_results_share_one_service_request(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    order = message("results/orm_o01_lab_order.hl7")
    await deliver(gateway, order)
    before: list[dict[str, Any]] = await search(fhir, "ServiceRequest")
    await deliver(gateway, with_control_id(order, "ORM-RESEND-2"))
    assert [s["id"] for s in await search(fhir, "ServiceRequest")] == \
        [s["id"] for s in before]
    assert gateway.app[APPLIER].failed == 0


async def test_the_order_and_its_results_update_one_service_request(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    placer = "PL-5531^WardApp^2.16.840.1.113883.3.9999.2^ISO"  # the ORU's first order
    order = with_fields(with_fields(message("results/orm_o01_lab_order.hl7"), "ORC",
                                    {2: placer}), "OBR", {2: placer})
    await deliver(gateway, order)
    [ordered] = await search(fhir, "ServiceRequest?identifier="
                                   "urn:oid:2.16.840.1.113883.3.9999.2|PL-5531")
    await deliver(gateway, message("results/oru_r01_lab_results.hl7"))
    [resulted] = await search(fhir, "ServiceRequest?identifier="
                                    "urn:oid:2.16.840.1.113883.3.9999.2|PL-5531")
    assert resulted["id"] == ordered["id"]
    assert resulted["meta"]["versionId"] == "2"
    [report] = [r for r in await search(fhir, "DiagnosticReport")
                if r["code"]["coding"][0]["code"] == "24323-8"]
    assert report["basedOn"] == [{"reference": f"ServiceRequest/{ordered['id']}"}]
