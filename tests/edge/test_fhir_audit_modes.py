"""fhir.audit_reads: durable (answer after the commit), queued (answer once queued; a
failed commit makes the next reads wait again), off (no read records)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.audit.query import AuditQuery
from gateway.audit.record import Action
from gateway.edge.audit_http import AUDIT
from support.builders import patient
from support.fhir import API_KEY_NAME, fhir_session, start_fhir_gateway
from support.wait import eventually

PATIENT = patient("AM-1", system="urn:oid:2.999.7", family="Audited")


async def reads_recorded(gw: object, action: Action) -> int:
    audit = gw.app[AUDIT]  # type: ignore[attr-defined]
    return len(await audit.search(AuditQuery(client=API_KEY_NAME, action=action)))


@pytest.mark.parametrize(("mode", "expected"), [
    ("durable", 2), (True, 2), ("queued", 2), ("off", 0), (False, 0)])
async def test_each_mode_records_reads_and_searches_or_not(
        tmp_path: Path, mode: str | bool, expected: int) -> None:
    gw = await start_fhir_gateway(tmp_path / "var", **{"fhir.audit_reads": mode})
    try:
        async with fhir_session(gw) as http:
            async with http.post("/fhir/Patient", json=PATIENT) as created:
                id_ = (await created.json())["id"]
            async with http.get(f"/fhir/Patient/{id_}") as read:
                assert read.status == 200
            async with http.get("/fhir/Patient?identifier=AM-1") as found:
                assert found.status == 200
        async def recorded() -> int:
            return (await reads_recorded(gw, Action.READ)
                    + await reads_recorded(gw, Action.SEARCH))

        async def all_there() -> bool:
            return await recorded() >= expected

        if expected:  # a queued record commits within the next group commit
            await eventually(all_there, what=f"{expected} read and search records")
        else:
            await asyncio.sleep(0.2)  # deliberate: the time in which a stray record would land
        assert await recorded() == expected
        assert await reads_recorded(gw, Action.CREATE) == 1  # writes: always, durably
    finally:
        await gw.runner.cleanup()


async def test_queued_reads_wait_again_once_a_record_could_not_be_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gw = await start_fhir_gateway(tmp_path / "var", **{"fhir.audit_reads": "queued"})
    try:
        async with fhir_session(gw) as http:
            async with http.post("/fhir/Patient", json=PATIENT) as created:
                id_ = (await created.json())["id"]
            await gw.app[AUDIT].store.stop_writer()  # the audit trail can take no more
            async with http.get(f"/fhir/Patient/{id_}") as first:
                assert first.status == 200  # answered before its record failed
            await eventually(lambda: "could not be committed" in caplog.text,
                             what="the failed queued record")
            async with http.get(f"/fhir/Patient/{id_}") as second:
                assert second.status == 503  # fail closed: now it waits, and cannot
                assert (await second.json())["resourceType"] == "OperationOutcome"
    finally:
        await gw.runner.cleanup()
