"""Three `isthmus serve` processes on one PostgreSQL database (issue 16): senders spread
over them, one message sent to two instances at once stored once, one instance killed
with SIGKILL mid-stream and restarted, every AA'd message stored exactly once, every
outbox row delivered to the fake EHR in its patient's order (a row in flight at the kill
may arrive again under the same X-Request-Id, as on SQLite), FHIR reads on any instance
seeing writes made through another, and the one audit chain intact.

Each patient's messages come in over two instances at once (two senders), so the two
instances commit that patient's rows concurrently: the patient's order is its inbox id
order, and the fake EHR must receive the rows in it."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import defaultdict
from pathlib import Path

import asyncpg
import pytest

from conftest import GatewayProcess, MllpPeer, message, segments
from gateway.app.audit import audit_keys
from support import postgres
from support.audit import run_cli, settings_for
from support.fake_ehr import FakeEhr
from support.fhir import API_KEY
from support.wait import eventually

ADT = message("adt_a01.hl7")
PATIENTS, PER_PATIENT = 9, 20


def adt(patient: int, sequence: int) -> bytes:
    text = ADT.replace(b"MRN-100001", f"MRN-{patient:06d}".encode())
    return text.replace(b"CTRL-ADT-0001", f"CTRL-P{patient:03d}-{sequence:05d}".encode())


async def send_lane(process: GatewayProcess, lane: list[bytes]) -> set[str]:
    """Send a patient's messages in order, one at a time (the next only after the ACK), to
    one instance; if it dies, resend from the first one not answered once it is back.
    Returns the control ids answered AA."""
    accepted: set[str] = set()
    position = 0
    while position < len(lane):
        try:
            peer = await MllpPeer.open(process.mllp_port)
        except OSError:
            await asyncio.sleep(0.2)  # restarting
            continue
        try:
            while position < len(lane):
                ack = segments(await peer.request(lane[position], timeout=30))
                if ack["MSA"][0][1] == "AA":
                    accepted.add(ack["MSA"][0][2])
                    position += 1
        except (ConnectionError, OSError, TimeoutError):
            await asyncio.sleep(0.2)
        finally:
            await peer.close()
    return accepted


@pytest.mark.slow
async def test_three_instances_share_one_database_and_lose_or_double_nothing(
        tmp_path: Path) -> None:
    spec = await postgres.new_schema()
    keys_dir = tmp_path / "shared-keys"
    audit_keys(settings_for(keys_dir), create=True)  # every instance: the same keys
    key_sha = hashlib.sha256(API_KEY.encode()).hexdigest()
    processes: list[GatewayProcess] = []
    try:
        async with FakeEhr() as fake:
            fake.delay = 0.005
            config = tmp_path / "isthmus.toml"
            config.write_text(
                f'[store]\nbackend = "postgresql"\nurl = "{spec.url}"\n'
                f'schema = "{spec.schema}"\n'
                f'[audit]\nkey_file = "{keys_dir}/keys/audit-data.keys"\n'
                f'signing_key_file = "{keys_dir}/keys/audit-signing.pem"\n'
                f'[[auth.api_keys]]\nname = "reader"\nkey_sha256 = "{key_sha}"\n'
                'scopes = ["system/*.cruds"]\n'
                f'[[backends]]\nname = "ehr"\nkind = "fhir"\nbase_url = "{fake.url}"\n'
                'backoff_base = 0.02\nretry_max_delay = 0.2\nbreaker_reset = 0.2\n'
                'max_attempts = 1000\n'
                '[[routes]]\nmatch = { message = "ADT^*" }\nto = ["ehr", "local"]\n')
            env = {"ISTHMUS_CONFIG": str(config)}
            processes = [GatewayProcess(tmp_path / f"instance-{n}", env=env)
                         for n in range(3)]
            await asyncio.gather(*(asyncio.to_thread(p.start, 60) for p in processes))

            # The same message to two instances at once: stored once, one ACK for both.
            twice = adt(99, 0)
            peers = [await MllpPeer.open(p.mllp_port) for p in processes[:2]]
            acks = await asyncio.gather(*(peer.request(twice, timeout=30) for peer in peers))
            assert acks[0] == acks[1] and segments(acks[0])["MSA"][0][1] == "AA"
            for peer in peers:
                await peer.close()

            # Two senders per patient (even and odd sequence numbers), on two instances.
            sending = [asyncio.create_task(send_lane(
                processes[(p + half) % 3],
                [adt(p, s) for s in range(half, PER_PATIENT, 2)]))
                for p in range(PATIENTS) for half in (0, 1)]
            await eventually(lambda: len(fake.transactions) >= 40, timeout=60,
                             what="some deliveries")
            processes[2].kill()  # mid-stream: its senders wait and resend
            await asyncio.to_thread(processes[2].start, 60)
            accepted = set().union(*await asyncio.gather(*sending))
            expected = PATIENTS * PER_PATIENT + 1
            assert len(accepted) == PATIENTS * PER_PATIENT

            await eventually(lambda: len({t.request_id for t in fake.transactions})
                             >= expected, timeout=120, what="every delivery")

            connection = await asyncpg.connect(spec.url)
            try:
                await connection.execute(f'SET search_path = "{spec.schema}"')
                stored = await connection.fetch(
                    "SELECT control_id, count(*), min(id) FROM inbox GROUP BY control_id")
                outbox = await connection.fetchval(
                    "SELECT count(*) FROM outbox WHERE status = 'delivered'")
            finally:
                await connection.close()
            counts = {str(row[0]): int(row[1]) for row in stored}
            inbox_ids = {str(row[0]): int(row[2]) for row in stored}
            assert all(n == 1 for n in counts.values())  # nothing stored twice
            assert accepted | {"CTRL-P099-00000"} <= set(counts)  # nothing AA'd lost
            assert outbox <= expected

            # FHIR: a patient ingested at instance 1 is read at instances 0 and 2.
            for process in (processes[0], processes[2]):
                found = await fhir_search(process, "MRN-000001")
                assert found == 1
            code, out, err = await asyncio.to_thread(
                run_cli, "--config", str(config), "audit", "--data-dir",
                str(tmp_path / "instance-0"), "verify")
            assert code == 0, out + err
    finally:
        for process in processes:
            process.kill()
        await postgres.drop_schema(spec)

    arrivals: dict[int, list[int]] = defaultdict(list)
    request_ids: dict[tuple[int, int], set[str | None]] = defaultdict(set)
    for received in fake.transactions:
        found = re.search(rb"CTRL-P(\d{3})-(\d{5})", received.body)
        assert found is not None
        patient, sequence = int(found.group(1)), int(found.group(2))
        arrivals[patient].append(sequence)
        request_ids[(patient, sequence)].add(received.request_id)
    for patient in range(PATIENTS):
        # The patient's order: its inbox ids (two instances committed its rows at once).
        def rank(sequence: int, patient: int = patient) -> int:
            return inbox_ids[f"CTRL-P{patient:03d}-{sequence:05d}"]

        in_order = sorted(range(PER_PATIENT), key=rank)
        firsts = list(dict.fromkeys(arrivals[patient]))
        assert firsts == in_order, (patient, arrivals[patient], in_order)
        # A repeat (a row in flight at the kill) comes before the patient's next row.
        ranks = [rank(sequence) for sequence in arrivals[patient]]
        assert ranks == sorted(ranks), (patient, arrivals[patient], in_order)
        # Each sender's messages in the order it sent them.
        for half in (0, 1):
            assert [s for s in in_order if s % 2 == half] == list(
                range(half, PER_PATIENT, 2))
    assert all(len(ids) == 1 for ids in request_ids.values())  # a repeat is the same row
    assert len(fake.transactions) - expected <= 16  # at most the deliveries in flight


async def fhir_search(process: GatewayProcess, mrn: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession(headers={"X-API-Key": API_KEY}) as http, http.get(
            f"http://127.0.0.1:{process.http_port}/fhir/Patient",
            params={"identifier": mrn}) as response:
        assert response.status == 200
        return len((await response.json()).get("entry", []))
