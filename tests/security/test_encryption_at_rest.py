"""Issue 13, item 10: PHI at rest is sealed. Someone who can read the data files (a copied
disk, a backup) finds no patient data in the inbox, outbox, dead letters or FHIR store of a
new data dir; a data dir made before keeps working and `isthmus store encrypt` seals it in
place; a missing or wrong key stops a start with one clear line."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import GatewayProcess, MllpPeer, RunningGateway, message, segments, start_gateway
from gateway.store.outbox import SqliteOutbox
from support.builders import patient
from support.cli import isthmus
from support.fake_ehr import FakeEhr
from support.fhir import fhir_session, start_fhir_gateway
from support.sealed import ADT_CANARIES, canaries_in_files, inbox_messages
from support.wait import eventually

# MSH-15 AL, MSH-16 NE (enhanced mode): a commit ACK, CA.
CANARY_ADT = message("canary_adt_a01.hl7")
FHIR_CANARIES = (b"mrnfhircanary", b"qzxfhircanary", b"wqvfhirgiven")
ALL_CANARIES = (*ADT_CANARIES, *FHIR_CANARIES)


async def _ingest_and_write(gw: RunningGateway) -> str:
    """The canary ADT over MLLP (applied to the FHIR store) and a canary Patient created and
    updated over FHIR (two versions in the history); returns the Patient's id."""
    peer = await MllpPeer.open(gw.mllp_port)
    try:
        assert segments(await peer.request(CANARY_ADT))["MSA"][0][1] == "CA"
    finally:
        await peer.close()
    async with fhir_session(gw) as session:
        created = await session.post("/fhir/Patient", json=patient(
            "MRNFHIRCANARY", family="Qzxfhircanary", given=["Wqvfhirgiven"]))
        assert created.status == 201, await created.text()
        body = await created.json()
        body["gender"] = "female"
        updated = await session.put(f"/fhir/Patient/{body['id']}", json=body)
        assert updated.status == 200, await updated.text()
        await eventually(lambda: _has(gw, "identifier=MRNCANARY77123"))
    return str(body["id"])


async def _has(gw: RunningGateway, query: str) -> bool:
    async with fhir_session(gw) as session:
        answer = await session.get(f"/fhir/Patient?{query}")
        return answer.status == 200 and bool((await answer.json()).get("entry"))


async def _found(gw: RunningGateway, query: str) -> list[str]:
    async with fhir_session(gw) as session:
        answer = await session.get(f"/fhir/Patient?{query}")
        assert answer.status == 200, await answer.text()
        bundle: dict[str, Any] = await answer.json()
    ids = [str(e["resource"]["id"]) for e in bundle.get("entry", [])]
    assert ids, query
    return ids


async def _everything_readable(gw: RunningGateway, patient_id: str) -> None:
    for query in ("identifier=MRNCANARY77123", "family=qzxcanaryfam", "name=wqvcanary",
                  "family:exact=Qzxfhircanary", "identifier=MRNFHIRCANARY", "given=wqvfhir"):
        await _found(gw, query)
    async with fhir_session(gw) as session:
        history = await (await session.get(f"/fhir/Patient/{patient_id}/_history")).json()
        assert history["total"] == 2
        first = await session.get(f"/fhir/Patient/{patient_id}/_history/1")
        assert first.status == 200 and "Wqvfhirgiven" in await first.text()


async def test_no_phi_in_the_store_files_of_a_new_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    gw = await start_fhir_gateway(data_dir)
    try:
        patient_id = await _ingest_and_write(gw)
        await _everything_readable(gw, patient_id)
        async with fhir_session(gw) as session:
            refused = await session.get("/fhir/Patient?family:contains=fhircan")
            outcome = await refused.json()
        assert refused.status == 400 and outcome["resourceType"] == "OperationOutcome"
        assert "family:contains is not available" in json.dumps(outcome)
        assert "fhircan" not in json.dumps(outcome)
        # While it runs: the database files and their WAL files.
        assert canaries_in_files(data_dir, ALL_CANARIES) == {}
        assert inbox_messages(data_dir)[0][1] == CANARY_ADT  # opened with the data keys
    finally:
        await gw.runner.cleanup()
    assert canaries_in_files(data_dir, ALL_CANARIES) == {}
    code, out, _ = await isthmus("store", "--data-dir", str(data_dir), "status")
    assert code == 0 and "encryption: sealed" in out


async def test_dead_letters_hold_no_phi_and_are_delivered_opened_on_retry(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    async with FakeEhr() as fake:
        fake.fail_all(500)  # every attempt fails: the one attempt allowed dead-letters it
        gw = await start_gateway(data_dir, **{
            "backends": [{"name": "ehr", "kind": "fhir", "base_url": fake.url,
                          "max_attempts": 1, "backoff_base": 0.05}],
            "routes": [{"match": {"message": "ADT^*"}, "to": ["ehr"]}],
            "forward.poll_interval": 0.1})
        try:
            peer = await MllpPeer.open(gw.mllp_port)
            try:
                assert segments(await peer.request(CANARY_ADT))["MSA"][0][1] == "CA"
            finally:
                await peer.close()
            outbox = SqliteOutbox(gw.inbox.connection)

            async def dead() -> bool:
                return bool(await outbox.list_entries(status="dead"))

            await eventually(dead, timeout=20)
            assert canaries_in_files(data_dir, ADT_CANARIES) == {}
            fake.fail_all(None)
            assert await outbox.retry(None) == 1
            await eventually(lambda: bool(fake.transactions), timeout=20)
            # The Bundle the EHR received was opened from the sealed row: the patient's in it.
            assert "QZXCANARYFAM" in json.dumps(fake.transactions[0].bundle)
        finally:
            await gw.runner.cleanup()
    assert canaries_in_files(data_dir, ADT_CANARIES) == {}


async def test_a_plaintext_data_dir_keeps_working_and_store_encrypt_seals_it(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    gw = await start_fhir_gateway(data_dir, **{"encryption.enabled": False})
    try:
        patient_id = await _ingest_and_write(gw)
    finally:
        await gw.runner.cleanup()
    assert canaries_in_files(data_dir, ALL_CANARIES)  # the old way: in clear
    # Encryption on (the default) does not touch a data dir made before it.
    gw = await start_fhir_gateway(data_dir)
    try:
        await _everything_readable(gw, patient_id)
        await _found(gw, "family:contains=fhircan")  # a plaintext store searches as before
        # Refused while a gateway holds the data dir.
        code, _, err = await isthmus("store", "--data-dir", str(data_dir), "encrypt")
        assert code == 1 and "in use" in err and len(err.strip().splitlines()) == 1, err
    finally:
        await gw.runner.cleanup()
    code, out, err = await isthmus("store", "--data-dir", str(data_dir), "encrypt")
    assert code == 0, err
    assert "sealed 1 inbox values" in out and "FHIR resource versions" in out, out
    assert "verified" in out, out
    assert canaries_in_files(data_dir, ALL_CANARIES) == {}
    gw = await start_fhir_gateway(data_dir)
    try:
        await _everything_readable(gw, patient_id)
        await _ingest_and_write(gw)  # and new data is sealed too
    finally:
        await gw.runner.cleanup()
    assert canaries_in_files(data_dir, ALL_CANARIES) == {}
    code, out, err = await isthmus("inbox", "--data-dir", str(data_dir), "show", "1")
    assert code == 0 and "QZXCANARYFAM" in out, err


async def test_rotation_old_rows_open_new_rows_use_the_new_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    keys = tmp_path / "store.keys"  # outside the data dir
    old_key = "old " + base64.b64encode(b"o" * 32).decode()
    new_key = "new " + base64.b64encode(b"n" * 32).decode()
    keys.write_text(old_key + "\n")
    keys.chmod(0o600)
    gw = await start_fhir_gateway(data_dir, **{"encryption.key_file": keys})
    try:
        patient_id = await _ingest_and_write(gw)
    finally:
        await gw.runner.cleanup()
    assert not (data_dir / "keys" / "store-data.keys").exists()
    keys.write_text(f"{old_key}\n{new_key}\n")
    gw = await start_fhir_gateway(data_dir, **{"encryption.key_file": keys})
    try:
        await _everything_readable(gw, patient_id)
        async with fhir_session(gw) as session:
            created = await session.post("/fhir/Patient", json=patient("MRNROTATED"))
            assert created.status == 201
        await _found(gw, "identifier=MRNROTATED")
    finally:
        await gw.runner.cleanup()
    code, out, err = await isthmus("store", "--data-dir", str(data_dir), "status",
                                   env={"ISTHMUS_ENCRYPTION__KEY_FILE": str(keys)})
    assert code == 0 and "keys that sealed data: new, old" in out, (out, err)
    # Re-sealing under the newest key: then the old key can go, and everything opens.
    code, out, err = await isthmus("store", "--data-dir", str(data_dir), "encrypt",
                                   env={"ISTHMUS_ENCRYPTION__KEY_FILE": str(keys)})
    assert code == 0 and "sealed with new" in out, (out, err)
    with (data_dir / "inbox.db").open("rb") as fh:
        assert b"\x03old" not in fh.read()


@pytest.mark.slow
def test_a_missing_or_wrong_key_stops_serve_with_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    process = GatewayProcess(data_dir).start()
    assert process.terminate() == 0
    shutil.move(data_dir / "keys" / "store-data.keys", tmp_path / "kept.keys")
    wrong = "s1 " + base64.b64encode(b"w" * 32).decode()
    for env, expected in (({}, "no store data keys are at"),
                          ({"ISTHMUS_ENCRYPTION__KEYS": wrong}, "sealed data in this data dir "
                                                                "but is not in")):
        refused = GatewayProcess(data_dir, env=env)
        with pytest.raises(RuntimeError):
            refused.start()
        stderr = (tmp_path / "gateway-stderr.log").read_text()
        last = stderr.strip().splitlines()[-1]
        assert expected in last and "Traceback" not in stderr, stderr
        (tmp_path / "gateway-stderr.log").unlink()
