"""Two `isthmus serve` processes on one PostgreSQL database, applying to the shared FHIR
store: one patient's messages, acknowledged by two instances one after the other, end in
the store in their inbox order, even when the first instance's applier is far behind (a
backlog of other patients' messages) and the second applies its message first.

The sender sends patient P's ADT^A01 to instance A and has its AA, then (reconnected to
instance B, as through a load balancer) P's ADT^A08 with a new name: P's inbox order is
A01 then A08, so the store must end with the A08's name, whatever order the two
instances' appliers reach them in."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from conftest import GatewayProcess, MllpPeer, message, segments
from gateway.app.audit import audit_keys
from support import postgres
from support.audit import settings_for
from support.builders import with_fields
from support.fhir import API_KEY
from support.wait import eventually

ADT = message("adt_a01.hl7")
BACKLOG, LANES = 400, 4
MRN = "MRN-700001"


def backlog_message(n: int) -> bytes:
    """A new patient's admit: one of the backlog in front of P's first message."""
    raw = with_fields(ADT, "MSH", {10: f"CTRL-BACKLOG-{n:05d}"})
    return with_fields(raw, "PID", {3: f"MRN-B{n:05d}^^^SYNTHHOSP^MR"})


def patient_message(kind: str, control_id: str, family: str) -> bytes:
    """Patient P's message `kind` (A01 or A08) naming them `family`."""
    raw = with_fields(ADT, "MSH", {9: f"ADT^{kind}^ADT_A01", 10: control_id})
    raw = with_fields(raw, "EVN", {1: kind})
    return with_fields(raw, "PID", {3: f"{MRN}^^^SYNTHHOSP^MR", 5: f"{family}^Jane"})


async def send_pipelined(port: int, frames: list[bytes]) -> list[str]:
    """Send every frame on one connection without waiting, then read the ACKs: the MSA-1
    codes in order."""
    peer = await MllpPeer.open(port)
    try:
        for frame in frames:
            await peer.send(frame)
        return [segments(await peer.reply(timeout=30))["MSA"][0][1] for _ in frames]
    finally:
        await peer.close()


async def request(port: int, frame: bytes) -> str:
    peer = await MllpPeer.open(port)
    try:
        return segments(await peer.request(frame, timeout=30))["MSA"][0][1]
    finally:
        await peer.close()


async def family_of(process: GatewayProcess, mrn: str) -> list[str]:
    async with aiohttp.ClientSession(headers={"X-API-Key": API_KEY}) as http, http.get(
            f"http://127.0.0.1:{process.http_port}/fhir/Patient",
            params={"identifier": mrn}) as response:
        assert response.status == 200
        entries = (await response.json()).get("entry", [])
    return [name["family"] for entry in entries for name in entry["resource"]["name"]]


@pytest.mark.slow
async def test_patients_later_message_wins_when_another_instance_applies_it_first(
        tmp_path: Path) -> None:
    spec = await postgres.new_schema()
    keys_dir = tmp_path / "shared-keys"
    audit_keys(settings_for(keys_dir), create=True)
    key_sha = hashlib.sha256(API_KEY.encode()).hexdigest()
    config = tmp_path / "isthmus.toml"
    config.write_text(
        f'[store]\nbackend = "postgresql"\nurl = "{spec.url}"\nschema = "{spec.schema}"\n'
        f'[audit]\nkey_file = "{keys_dir}/keys/audit-data.keys"\n'
        f'signing_key_file = "{keys_dir}/keys/audit-signing.pem"\n'
        f'[[auth.api_keys]]\nname = "reader"\nkey_sha256 = "{key_sha}"\n'
        'scopes = ["system/*.cruds"]\n')
    env = {"ISTHMUS_CONFIG": str(config)}
    a, b = (GatewayProcess(tmp_path / f"instance-{name}", env=env) for name in "ab")
    try:
        await asyncio.gather(asyncio.to_thread(a.start, 60), asyncio.to_thread(b.start, 60))
        # A's applier falls behind: a burst of other patients' admits, acknowledged (the
        # inbox commits) long before they are applied.
        burst = [backlog_message(n) for n in range(BACKLOG)]
        lanes = [burst[i::LANES] for i in range(LANES)]
        codes = await asyncio.gather(*(send_pipelined(a.mllp_port, lane) for lane in lanes))
        assert all(code == "AA" for lane in codes for code in lane)

        assert await request(a.mllp_port, patient_message("A01", "CTRL-P-1", "FIRST")) == "AA"
        assert await request(b.mllp_port, patient_message("A08", "CTRL-P-2", "SECOND")) == "AA"

        connection = await asyncpg.connect(spec.url)
        try:
            await connection.execute(f'SET search_path = "{spec.schema}"')

            async def all_applied() -> bool:
                left = await connection.fetchval(
                    "SELECT count(*) FROM inbox WHERE status = 'translated'")
                return int(left) == 0

            await eventually(all_applied, timeout=45, interval=0.2,
                             what="every inbox row applied")
            statuses = dict(await connection.fetch(
                "SELECT status, count(*) FROM inbox GROUP BY status"))
            ids = dict(await connection.fetch(
                "SELECT control_id, id FROM inbox WHERE control_id LIKE 'CTRL-P-%'"))
        finally:
            await connection.close()
        assert statuses == {"applied": BACKLOG + 2}
        assert ids["CTRL-P-1"] < ids["CTRL-P-2"]  # P's inbox order: the A01, then the A08
        for process in (a, b):
            assert await family_of(process, MRN) == ["SECOND"]
    finally:
        a.kill()
        b.kill()
        await postgres.drop_schema(spec)
