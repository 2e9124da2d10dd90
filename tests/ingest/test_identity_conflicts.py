"""One identifier, one record: concurrent messages and concurrent FHIR conditional writes
for a new identifier make exactly one Patient; two Patients already sharing one (made
here directly in the store, as an earlier bug would have) are reported once, as an inbox
status and a metric, and resolved with `isthmus fhir merge` and a replay."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_mllp_to_store import deliver, search, send, statuses

from conftest import RunningGateway, message, start_gateway, with_control_id
from gateway.app.state import APPLIER, FHIR_STORE
from gateway.store.fhir import WriteRequest
from gateway.telemetry import configure
from support.builders import with_fields
from support.cli import isthmus
from support.fhir import ALL_SCOPES, API_KEY, API_KEY_NAME, api_key_config, fhir_session

SYSTEM = "urn:oid:1.2.3.4.5"
MRN = "MRN-600001"
A01 = with_fields(message("mapping_adt_a01.hl7"), "PID",
                  {3: f"{MRN}^^^SYNTHHOSP&1.2.3.4.5&ISO^MR"})
KEYS = {"auth.api_keys": [api_key_config(API_KEY_NAME, API_KEY, ALL_SCOPES)]}


@asynccontextmanager
async def metered(data_dir: Path) -> AsyncIterator[tuple[RunningGateway, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    running = await start_gateway(data_dir, telemetry=configure(
        "none", span_exporter=InMemorySpanExporter(), metric_reader=reader), **KEYS)
    try:
        yield running, reader
    finally:
        await running.runner.cleanup()


def conflicts_counted(reader: InMemoryMetricReader) -> float:
    data = reader.get_metrics_data()
    total = 0.0
    for resource_metrics in data.resource_metrics if data else []:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "isthmus.store.identity_conflicts":
                    total += sum(p.value for p in metric.data.data_points)
    return total


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    running = await start_gateway(tmp_path / "var", **KEYS)
    yield running
    await running.runner.cleanup()


@pytest.fixture
async def fhir(gateway: RunningGateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with fhir_session(gateway) as session:
        yield session


async def test_many_connections_admitting_one_new_patient_make_one_record(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    messages = [with_control_id(A01, f"RACE-{n}") for n in range(24)]
    codes = await asyncio.gather(*(send(gateway.mllp_port, m) for m in messages))
    assert all(c == ["CA"] for c in codes), codes
    await gateway.app[APPLIER].drain()
    assert len(await search(fhir, f"Patient?identifier={SYSTEM}|{MRN}")) == 1
    assert {s for _, s, _ in await statuses(gateway)} == {"applied"}


async def test_concurrent_conditional_creates_and_updates_make_one_record(
        gateway: RunningGateway, fhir: aiohttp.ClientSession) -> None:
    identifier = f"{SYSTEM}|FHIR-RACE-1"
    body = {"resourceType": "Patient", "identifier": [{"system": SYSTEM,
                                                       "value": "FHIR-RACE-1"}]}
    headers = {"Content-Type": "application/fhir+json"}

    async def create(n: int) -> int:
        async with fhir.post("/fhir/Patient", json={**body, "gender": "female"},
                             headers={**headers, "If-None-Exist": f"identifier={identifier}"}
                             ) as response:
            return response.status

    async def update(n: int) -> int:
        async with fhir.put(f"/fhir/Patient?identifier={identifier}",
                            json={**body, "birthDate": f"19{n + 10}-01-01"},
                            headers=headers) as response:
            return response.status

    statuses_seen = await asyncio.gather(*(create(n) for n in range(16)),
                                         *(update(n) for n in range(16)))
    assert set(statuses_seen) <= {200, 201}, statuses_seen
    assert statuses_seen.count(201) == 1  # exactly one of them created it
    assert len(await search(fhir, f"Patient?identifier={identifier}")) == 1


@pytest.mark.slow  # the isthmus command as a child process
async def test_an_existing_conflict_is_reported_once_and_resolved_by_merge_and_replay(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    data_dir = tmp_path / "var"
    twin: dict[str, Any] = {"identifier": [{"system": SYSTEM, "value": MRN}],
                            "name": [{"family": "CANARYTWIN"}]}
    async with metered(data_dir) as (running, reader):
        # Two records for one identifier, as a bug before this release could leave them.
        made = await running.app[FHIR_STORE].transact(
            [WriteRequest("POST", "Patient", resource=dict(twin)) for _ in range(2)])
        first, second = (outcome.stored.id for outcome in made  # type: ignore[union-attr]
                         if outcome.stored is not None)
        await deliver(running, with_control_id(A01, "TWIN-1"), with_control_id(A01, "TWIN-2"))
        assert [s for _, s, _ in await statuses(running)] == ["identity-conflict"] * 2
        reason = (await statuses(running))[0][2]
        assert "isthmus fhir merge" in reason and MRN not in reason
        assert conflicts_counted(reader) == 1
        warnings = [r for r in caplog.records if "identity-conflict" in r.getMessage()]
        assert len(warnings) == 1 and MRN not in warnings[0].getMessage()

    # The documented resolution: merge (gateway stopped), replay, start again.
    code, out, err = await isthmus("fhir", "--data-dir", str(data_dir), "merge",
                                   f"Patient/{first}", f"Patient/{second}")
    assert code == 0, err
    assert out.strip().startswith(f"merged Patient/{first} into Patient/{second}")
    code, out, err = await isthmus("inbox", "--data-dir", str(data_dir), "replay", "--failed")
    assert code == 0, err
    async with metered(data_dir) as (running, _):
        await running.app[APPLIER].drain()
        assert [s for _, s, _ in await statuses(running)] == ["applied"] * 2
        async with fhir_session(running) as fhir:
            [record] = await search(fhir, f"Patient?identifier={SYSTEM}|{MRN}")
            assert record["id"] == second
            assert record["name"][0]["family"] == "CANARYFAMILY"
            [gone] = await search(fhir, f"Patient?_id={first}")
            assert gone["active"] is False


@pytest.mark.slow  # the isthmus command as a child process
async def test_fhir_merge_refuses_a_running_gateway_and_bad_names(
        gateway: RunningGateway) -> None:
    data_dir = str(gateway.data_dir)
    code, _, err = await isthmus("fhir", "--data-dir", data_dir, "merge", "Patient/a",
                                 "Patient/b")
    assert code == 1 and "isthmus fhir merge:" in err and "Traceback" not in err
    for source, target in (("a", "Patient/b"), ("Patient/a", "Patient/a"),
                           ("Observation/a", "Patient/b")):
        code, _, err = await isthmus("fhir", "--data-dir", data_dir, "merge", source, target)
        assert code == 2 and err.startswith("isthmus fhir merge:"), err


@pytest.mark.slow  # the isthmus command as a child process
async def test_fhir_merge_of_records_that_do_not_exist_says_so(tmp_path: Path) -> None:
    async with metered(tmp_path / "var"):
        pass  # an initialised, stopped data dir
    code, _, err = await isthmus("fhir", "--data-dir", str(tmp_path / "var"), "merge",
                                 "Patient/nobody", "Patient/nobody-else")
    assert code == 1 and "does not exist" in err and "Traceback" not in err
