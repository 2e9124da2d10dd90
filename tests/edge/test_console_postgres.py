"""The operator console on PostgreSQL (issue 16): an instance's console shows every
instance's messages and deliveries from the shared database, opens a message for those
allowed, replays it, retries a dead delivery, and verifies the database's audit trail."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from conftest import MllpPeer, RunningGateway, message, segments
from gateway.app.audit import audit_keys
from gateway.store.pg.connect import PgSpec
from support import postgres
from support.audit import settings_for
from support.console import csrf_of, sign_in, start_console_gateway
from support.wait import eventually

CANARY = message("canary_adt_a01.hl7")


@pytest.fixture
async def instances(tmp_path: Path) -> AsyncIterator[tuple[RunningGateway, RunningGateway,
                                                            PgSpec]]:
    """Two instances on one schema; ADT goes to the local store and to a backend that is
    down and allows one attempt (a dead letter at once)."""
    spec = await postgres.new_schema()
    keys = tmp_path / "keys-home"
    audit_keys(settings_for(keys), create=True)
    config = {
        "store.backend": "postgresql", "store.url": spec.url, "store.schema": spec.schema,
        "audit.key_file": keys / "keys" / "audit-data.keys",
        "audit.signing_key_file": keys / "keys" / "audit-signing.pem",
        "console.secure_cookies": False, "forward.poll_interval": 0.1,
        "backends": [{"name": "ehr", "kind": "fhir", "base_url": "http://127.0.0.1:1/fhir",
                      "max_attempts": 1}],
        "routes": [{"match": {"message": "ADT^*"}, "to": ["ehr", "local"]}]}
    first = await start_console_gateway(tmp_path / "one", **config)
    second = None
    try:
        second = await start_console_gateway(tmp_path / "two", **config)
        yield first, second, spec
    finally:
        for running in (first, second):
            if running is not None:
                await running.runner.cleanup()
        await postgres.drop_schema(spec)


async def _dead(spec: PgSpec) -> int:
    connection = await asyncpg.connect(spec.url)
    try:
        return int(await connection.fetchval(
            f'SELECT count(*) FROM "{spec.schema}".outbox WHERE status = \'dead\''))
    finally:
        await connection.close()


async def test_the_console_shows_and_acts_on_the_shared_database(
        instances: tuple[RunningGateway, RunningGateway, PgSpec]) -> None:
    first, second, spec = instances
    peer = await MllpPeer.open(second.mllp_port)  # received by the other instance
    assert segments(await peer.request(CANARY))["MSA"][0][1] == "CA"
    await peer.close()
    await eventually(lambda: _dead(spec), timeout=30, what="the delivery dead-lettered")

    http, _ = await sign_in(first, "ops")
    async with http:
        async with http.get("/console/messages") as answer:
            assert answer.status == 200
            listing = await answer.text()
        assert "CANARY-A01-0001" in listing
        found = re.search(r'/console/messages/(\d+)"', listing)
        assert found is not None, listing
        inbox_id = found.group(1)
        async with http.get(f"/console/messages/{inbox_id}") as answer:
            assert answer.status == 200
            assert "QZXCANARYFAM" in await answer.text()  # opened, for a PHI user
        async with http.get("/console/dashboard") as answer:
            dashboard = await answer.text()
        assert "ADT^A01" in dashboard and "ehr" in dashboard
        async with http.get("/console/deliveries", params={"status": "dead"}) as answer:
            deliveries = await answer.text()
            token = csrf_of(deliveries)
        delivery = re.search(r'name="id" value="(\d+)"', deliveries)
        assert delivery is not None, deliveries
        async with http.post("/console/deliveries/retry",
                             data={"id": delivery.group(1), "csrf": token}) as answer:
            assert answer.status == 200
            assert "1 deliveries set to pending" in await answer.text()
        async with http.post(f"/console/messages/{inbox_id}/replay", data={"csrf": token},
                             allow_redirects=False) as answer:
            assert answer.status == 303
            assert answer.headers["Location"] == f"/console/messages/{inbox_id}/status"
        async with http.get(f"/console/messages/{inbox_id}/status") as answer:
            assert answer.status == 200
            assert "CANARY-A01-0001" in await answer.text()
        async with http.get("/console/messages/999999") as answer:
            assert answer.status == 404  # no such row in the database

    reviewer, _ = await sign_in(first, "reviewer")
    async with reviewer, reviewer.get("/console/audit/verify") as answer:
        verdict = await answer.text()
    # The database's trail, appended by both instances (the console's reads included).
    assert 'id="verdict">intact: ' in verdict
    records = re.search(r"intact: (\d+) records", verdict)
    assert records is not None and int(records.group(1)) >= 4
