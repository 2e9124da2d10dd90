"""Audit integrity (issue 13, items 7 and 8).

7. A FHIR write never becomes visible without its audit record: with the audit database
   locked by another connection, every kind of write answers 503 and stores nothing, and
   the client's retry of that 503 makes exactly one resource.
8. Rollback and truncation of the audit trail are caught by something kept outside the
   data directory: an expected head, the published checkpoint file, the head in the log
   line, an HTTP witness, and a signing key kept apart from the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support.fhir import fhir_session, start_fhir_gateway

SYSTEM = "urn:oid:2.999.13.7"
FHIR_JSON = "application/fhir+json"


def observation(label: str, status: str = "final", id_: str | None = None) -> dict[str, Any]:
    """A synthetic Observation known by the identifier `label`."""
    resource: dict[str, Any] = {
        "resourceType": "Observation", "identifier": [{"system": SYSTEM, "value": label}],
        "status": status, "code": {"coding": [{"system": "http://loinc.org",
                                               "code": "8867-4"}]},
        "subject": {"reference": "Patient/synthetic-13"}}
    if id_ is not None:
        resource["id"] = id_
    return resource


def bundle(kind: str, *labels: str) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": [
        {"fullUrl": f"urn:uuid:00000000-0000-4000-8000-00000000000{n}",
         "resource": observation(label),
         "request": {"method": "POST", "url": "Observation"}}
        for n, label in enumerate(labels)]}


@contextlib.contextmanager
def audit_locked(data_dir: Path) -> Iterator[None]:
    """Another connection holds the write lock on audit.db (as a backup tool or a stuck
    CLI would): the gateway's audit writer cannot commit until it is released."""
    db = sqlite3.connect(data_dir / "audit.db", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


async def fhir(http: aiohttp.ClientSession, method: str, path: str,
               body: dict[str, Any] | None = None,
               **headers: str) -> tuple[int, dict[str, Any]]:
    sent = {"Content-Type": FHIR_JSON, **headers} if body is not None else headers
    async with http.request(method, path, json=body, headers=sent) as response:
        text = await response.read()
        return response.status, (await response.json(content_type=None) if text else {})


async def labelled(http: aiohttp.ClientSession, label: str) -> list[dict[str, Any]]:
    """The current Observations carrying identifier `label`."""
    status, found = await fhir(http, "GET", f"/fhir/Observation?identifier={SYSTEM}|{label}")
    assert status == 200, found
    return [e["resource"] for e in found.get("entry", [])]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Any]:
    running = await start_fhir_gateway(tmp_path / "var")
    try:
        yield running
    finally:
        await running.runner.cleanup()


async def test_writes_with_the_audit_store_locked_answer_503_and_store_nothing(
        gateway: Any) -> None:
    async with fhir_session(gateway) as http:
        status, kept = await fhir(http, "POST", "/fhir/Observation", observation("kept"))
        assert status == 201, kept
        kept_id = kept["id"]
        status, doomed = await fhir(http, "POST", "/fhir/Observation",
                                    observation("doomed"))
        assert status == 201, doomed
        doomed_id = doomed["id"]
        writes = [
            ("POST", "/fhir/Observation", observation("create"), {}),
            ("POST", "/fhir/Observation", observation("if-none-exist"),
             {"If-None-Exist": f"identifier={SYSTEM}|if-none-exist"}),
            ("PUT", f"/fhir/Observation/{kept_id}",
             observation("kept", "amended", kept_id), {}),
            ("PUT", f"/fhir/Observation?identifier={SYSTEM}|cond-update",
             observation("cond-update"), {}),
            ("DELETE", f"/fhir/Observation/{doomed_id}", None, {}),
            ("DELETE", f"/fhir/Observation?identifier={SYSTEM}|kept", None, {}),
            ("POST", "/fhir", bundle("transaction", "tx-1", "tx-2"), {}),
            ("POST", "/fhir", bundle("batch", "batch-1", "batch-2"), {}),
        ]
        with audit_locked(gateway.data_dir):
            answers = await asyncio.gather(*(
                fhir(http, method, path, body, **headers)
                for method, path, body, headers in writes))
        for (method, path, _, _), (status, outcome) in zip(writes, answers, strict=True):
            assert status == 503, f"{method} {path}: {status} {outcome}"
            assert outcome["resourceType"] == "OperationOutcome"
        # Nothing of what was answered 503 is stored.
        for label in ("create", "if-none-exist", "cond-update", "tx-1", "tx-2", "batch-1",
                      "batch-2"):
            assert await labelled(http, label) == [], label
        status, current = await fhir(http, "GET", f"/fhir/Observation/{kept_id}")
        assert status == 200 and current["status"] == "final"
        assert current["meta"]["versionId"] == "1"
        status, _ = await fhir(http, "GET", f"/fhir/Observation/{doomed_id}")
        assert status == 200
        # The client retries its 503: exactly one resource, and it is on record.
        status, _ = await fhir(http, "POST", "/fhir/Observation", observation("create"))
        assert status == 201
        assert len(await labelled(http, "create")) == 1


async def test_a_write_to_a_remote_backend_is_on_record_before_it_is_sent(
        tmp_path: Path) -> None:
    from support.fake_ehr import FakeEhr

    ehr = FakeEhr()
    await ehr.start()
    gw = await start_fhir_gateway(
        tmp_path / "var", backends=[{"name": "ehr", "kind": "fhir", "base_url": ehr.url,
                                     "max_retries": 0, "backoff_base": 0.01}],
        routes=[{"match": {"resource": "Appointment"}, "to": ["ehr"]}])
    appointment = {"resourceType": "Appointment", "status": "booked",
                   "start": "2030-01-02T09:00:00Z", "end": "2030-01-02T09:15:00Z",
                   "participant": [{"actor": {"reference": "Patient/synthetic-13"},
                                    "status": "accepted"}]}
    try:
        async with fhir_session(gw) as http:
            with audit_locked(gw.data_dir):
                status, outcome = await fhir(http, "POST", "/fhir/Appointment", appointment)
            assert status == 503, outcome
            assert [r for r in ehr.requests if r.method == "POST"] == []  # never sent
            status, _ = await fhir(http, "POST", "/fhir/Appointment", appointment)
            assert status == 201
            assert len([r for r in ehr.requests if r.method == "POST"]) == 1
    finally:
        await gw.runner.cleanup()
        await ehr.stop()


# -- 8. rollback and truncation, caught by heads kept outside the data dir -----------------


async def signed_log(data_dir: Path, records: int = 12, **overrides: Any) -> None:
    """Records 1..N as the gateway writes them (checkpoints at 5, 10 and on close, each
    published as configured)."""
    from gateway.app.audit import open_audit
    from support.audit import settings_for, write_records

    log = await open_audit(settings_for(data_dir, **overrides))
    written = 0
    for at in (*(n for n in (5, 10) if n < records), records):
        await write_records(log, written + 1, at)
        written = at
        if at != records:
            await log.checkpoint()
    await log.close()


def verify(data_dir: Path, *args: str, **config: str) -> tuple[int, str]:
    """`isthmus audit verify` on a data dir, with a config file for `config` if given."""
    from support.audit import run_cli

    options: list[str] = []
    if config:
        file = data_dir.parent / "isthmus.toml"
        file.write_text("[audit]\n" + "".join(f'{k} = "{v}"\n' for k, v in config.items()))
        options = ["--config", str(file)]
    code, out, err = run_cli(*options, "audit", "--data-dir", str(data_dir), "verify", *args)
    return code, out + err


def cut_tail(data_dir: Path, after: int, *, checkpoints_too: bool = True,
             all_checkpoints: bool = False) -> None:
    """The attacker with file access deletes records after `after` (and the checkpoints
    that would show it)."""
    from support.audit import attacker

    with attacker(data_dir) as db:
        db.execute("DELETE FROM audit_record WHERE seq > ?", (after,))
        if all_checkpoints:
            db.execute("DELETE FROM audit_checkpoint")
        elif checkpoints_too:
            db.execute("DELETE FROM audit_checkpoint WHERE count > ?", (after,))


def head_of(data_dir: Path, seq: int) -> str:
    with contextlib.closing(sqlite3.connect(data_dir / "audit.db")) as db:
        [digest] = db.execute("SELECT hash FROM audit_record WHERE seq = ?", (seq,)).fetchone()
    return f"{seq}:{digest.hex()}"


async def test_a_tail_deleted_with_its_checkpoints_is_caught_by_an_expected_head(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "var"
    with caplog.at_level("INFO", logger="gateway.audit.log"):
        await signed_log(data_dir)
    head = head_of(data_dir, 12)
    cut_tail(data_dir, 8)
    code, out = verify(data_dir)
    assert code == 0, out  # the store alone is consistent: that is the attack
    assert "no head kept outside the store" in out
    code, out = verify(data_dir, "--expect-head", head)
    assert code == 1, out
    assert out.startswith("audit trail NOT intact: record 9: records 9..12 are missing"), out
    assert "--expect-head holds its head at record 12 (rolled back or truncated)" in out
    # The log line each checkpoint writes is such a head: shipped logs catch it too.
    shipped = tmp_path / "shipped.log"
    shipped.write_text("\n".join(r.getMessage() for r in caplog.records))
    assert "audit checkpoint signed: record 12, head " in shipped.read_text()
    code, out = verify(data_dir, "--expect-head-file", str(shipped))
    assert code == 1 and "records 9..12 are missing" in out, out
    # A head that the chain reaches is reported as the anchor.
    code, out = verify(data_dir, "--expect-head", head_of(data_dir, 8))
    assert code == 0 and "anchored up to record 8 by --expect-head" in out, out


async def test_all_checkpoints_deleted_is_caught_by_the_published_directory(
        tmp_path: Path) -> None:
    data_dir, published = tmp_path / "var", tmp_path / "other-mount" / "heads"
    published.mkdir(parents=True)
    await signed_log(data_dir, **{"audit.checkpoint_publish": published})
    assert len(list(published.iterdir())) == 3  # one file a checkpoint: 5, 10, 12
    cut_tail(data_dir, 7, all_checkpoints=True)
    code, out = verify(data_dir)
    assert code == 0 and "no signed checkpoint yet" in out, out
    # audit.checkpoint_publish is read by default once configured.
    code, out = verify(data_dir, checkpoint_publish=str(published))
    assert code == 1, out
    assert out.startswith("audit trail NOT intact: record 8: records 8..12 are missing"), out
    assert f"{published}/" in out


async def test_an_older_copy_of_audit_db_is_caught_by_the_published_file(
        tmp_path: Path) -> None:
    import shutil

    from conftest import start_gateway
    from gateway.audit.log import AuditIntegrityError

    data_dir, published = tmp_path / "var", tmp_path / "other-mount" / "heads.log"
    published.parent.mkdir()
    config = {"audit.checkpoint_publish": published}
    await signed_log(data_dir, records=6, **config)
    backup = tmp_path / "audit-backup.db"
    shutil.copy(data_dir / "audit.db", backup)
    code, out = verify(data_dir, checkpoint_publish=str(published))
    assert code == 0 and "anchored up to record 6 by" in out, out
    # More records later (12 in all), then the older copy put back in place.
    from gateway.app.audit import open_audit
    from support.audit import settings_for, write_records

    log = await open_audit(settings_for(data_dir, **config))
    await write_records(log, 7, 12)
    await log.close()
    for suffix in ("-wal", "-shm"):
        (data_dir / f"audit.db{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, data_dir / "audit.db")
    assert verify(data_dir)[0] == 0  # the store alone: an intact, shorter log
    code, out = verify(data_dir, checkpoint_publish=str(published))
    assert code == 1, out
    assert out.startswith("audit trail NOT intact: record 7: records 7..12 are missing"), out
    # The gateway refuses to extend (and re-sign) the rolled-back trail.
    with pytest.raises(AuditIntegrityError, match="rolled back or truncated"):
        gw = await start_gateway(data_dir, **config)
        await gw.runner.cleanup()


async def test_audit_db_replaced_with_a_new_log_is_caught_by_the_published_file(
        tmp_path: Path) -> None:
    from support.audit import open_log, write_records

    data_dir, published = tmp_path / "var", tmp_path / "other-mount" / "heads.log"
    published.parent.mkdir()
    await signed_log(data_dir, records=6, **{"audit.checkpoint_publish": published})
    for suffix in ("", "-wal", "-shm"):
        (data_dir / f"audit.db{suffix}").unlink(missing_ok=True)
    fresh = await open_log(data_dir)  # a new log, signed with the same key
    await write_records(fresh, 1, 3)
    await fresh.close()
    assert verify(data_dir)[0] == 0
    code, out = verify(data_dir, checkpoint_publish=str(published))
    assert code == 1, out
    assert "belong to audit log" in out and "the audit database was replaced" in out, out


async def test_a_forged_line_in_the_published_file_is_named(tmp_path: Path) -> None:
    import json

    data_dir, published = tmp_path / "var", tmp_path / "other-mount" / "heads.log"
    published.parent.mkdir()
    await signed_log(data_dir, records=6, **{"audit.checkpoint_publish": published})
    cut_tail(data_dir, 4)
    # The attacker also rewrites the published heads to match the shorter log.
    lines = [json.loads(line) for line in published.read_text().splitlines()]
    for line in lines:
        line["count"], line["head"] = 4, head_of(data_dir, 4).partition(":")[2]
    published.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, out = verify(data_dir, checkpoint_publish=str(published))
    assert code == 1, out
    forged = f"checkpoint at record 4: the head {published}:1 holds: its signature does not"
    assert forged in out, out


class Witness:
    """An HTTP witness on 127.0.0.1 that keeps every head POSTed to it."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.url = ""

    async def receive(self, request: Any) -> Any:
        from aiohttp import web

        self.heads.append(await request.read())
        return web.Response(status=201)


@pytest.fixture
async def witness() -> AsyncIterator[Witness]:
    from aiohttp import web

    kept = Witness()
    app = web.Application()
    app.router.add_post("/heads", kept.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    kept.url = f"http://127.0.0.1:{runner.addresses[0][1]}/heads"
    try:
        yield kept
    finally:
        await runner.cleanup()


async def test_a_tail_cut_and_resigned_with_the_key_beside_the_data_is_caught_by_the_witness(
        tmp_path: Path, witness: Witness) -> None:
    from support.audit import open_log

    data_dir = tmp_path / "var"
    await signed_log(data_dir, **{"audit.witness_url": witness.url})
    assert len(witness.heads) == 3
    kept = tmp_path / "witness-heads.log"
    kept.write_bytes(b"".join(witness.heads))
    code, out = verify(data_dir, "--expect-head-file", str(kept))
    assert code == 0 and f"anchored up to record 12 by {kept}:3" in out, out
    # The attacker cuts records 9..12 and their checkpoints, then signs the shorter log
    # with the signing key found in var/keys/ (here: by opening it as the gateway does).
    cut_tail(data_dir, 8)
    resigned = await open_log(data_dir)
    await resigned.close()
    code, out = verify(data_dir)
    assert code == 0 and "signed through record 8" in out, out
    code, out = verify(data_dir, "--expect-head-file", str(kept))
    assert code == 1, out
    assert out.startswith("audit trail NOT intact: record 9: records 9..12 are missing"), out
    assert f"{kept}:3 holds its head at record 12" in out


async def test_a_signing_key_beside_the_data_is_warned_about_at_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from conftest import start_gateway
    from gateway.audit.keys import create_signing_key_files

    with caplog.at_level("WARNING", logger="gateway.app.audit"):
        gw = await start_gateway(tmp_path / "var")
        await gw.runner.cleanup()
    assert any("audit signing key" in r.getMessage() and "inside the data dir"
               in r.getMessage() for r in caplog.records)
    caplog.clear()
    secrets = tmp_path / "secrets"
    create_signing_key_files(secrets / "audit-signing.pem", secrets / "audit-signing.pub.pem")
    with caplog.at_level("WARNING", logger="gateway.app.audit"):
        gw = await start_gateway(tmp_path / "var2", **{
            "audit.signing_key_file": secrets / "audit-signing.pem"})
        await gw.runner.cleanup()
    assert not any("audit signing key" in r.getMessage() for r in caplog.records)
