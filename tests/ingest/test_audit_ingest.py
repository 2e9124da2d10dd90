"""Every MLLP message is on record before its answer goes out: accepted, duplicate and
refused ones; fail closed when the audit trail cannot be written; PHI only encrypted."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import (
    MllpPeer,
    RunningGateway,
    message,
    segments,
    start_gateway,
    with_control_id,
)
from gateway.audit.log import AuditLog
from gateway.audit.query import AuditQuery
from gateway.audit.sealed import parse_body, reveal
from gateway.edge.audit_http import AUDIT
from gateway.hl7.message import content_digest, parse_message
from gateway.telemetry import configure
from support.audit import AUDIT_DB, CANARY_FAMILY, CANARY_MRN, run_cli
from support.pki import Pki, lab
from support.tls import exchange, mtls, tls_gateway

ADT = message("adt_a01.hl7")  # PID-3 MRN-100001^^^SYNTHHOSP^MR, PID-5 CANARYFAMILY^Jane
PHI = (CANARY_FAMILY, CANARY_MRN, "Example Street", "Springfield", "Quinn", "19800102")


def audit_of(gateway: RunningGateway) -> AuditLog:
    return gateway.app[AUDIT]


async def records(gateway: RunningGateway) -> list[dict[str, Any]]:
    """Every record, decoded, with its PHI decrypted under 'phi'."""
    audit = audit_of(gateway)
    out = []
    for row in await audit.search(AuditQuery(), limit=1000):
        body = parse_body(row.body)
        revealed = reveal(body, audit.keys.ring)
        body["seq"] = row.seq
        body["phi"] = revealed.patient if revealed else None
        out.append(body)
    return out


async def test_an_accepted_message_is_on_record_before_its_ack(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    ack = segments(await peer.request(with_control_id(ADT, "AUDIT-1")))
    await peer.close()
    assert ack["MSA"][0][1] == "AA"
    # The ACK came back, so the record is already committed: no waiting here.
    (record,) = await records(gateway)
    assert record["action"] == "ingest" and record["outcome"] == "success"
    assert record["client"] == "SYNTHLAB|SYNTHHOSP"
    assert (record["app"], record["facility"]) == ("SYNTHLAB", "SYNTHHOSP")
    assert record["control_id"] == "AUDIT-1" and record["type"] == "ADT^A01"
    assert record["peer"].startswith("127.0.0.1:")
    assert record["phi"] == f"SYNTHHOSP|{CANARY_MRN}"
    assert record["detail"] == "translated"


async def test_a_duplicate_resend_is_an_access_and_gets_its_own_record(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    raw = with_control_id(ADT, "AUDIT-DUP")
    first = await peer.request(raw)
    assert await peer.request(raw) == first
    await peer.close()
    assert await gateway.inbox.count() == 1
    found = [r for r in await records(gateway) if r["control_id"] == "AUDIT-DUP"]
    assert len(found) == 2 and all(r["outcome"] == "success" for r in found)


@pytest.mark.parametrize(("payload", "outcome", "patient"), [
    (b"MSH|^~\\&|LAB|HOSP|ISTHMUS|GW|20261126||ADT^A01|BAD-1|P|9.9\r"
     b"PID|1||MRN-100001^^^HOSP||CANARYFAMILY^Jane\r", "AR:203", "HOSP|MRN-100001"),
    (b"this is not HL7 at all", "AR:100", None),
    (b"MSH|^~\\&|LAB|HOSP|ISTHMUS|GW|20261126||ADT^A01||P|2.5\r", "AR:101", None),
])
async def test_refused_messages_are_on_record_with_their_answer(
        gateway: RunningGateway, payload: bytes, outcome: str, patient: str | None) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    ack = segments(await peer.request(payload))
    await peer.close()
    assert ack["MSA"][0][1] in ("AR", "AE")
    (record,) = await records(gateway)
    assert record["outcome"] == outcome
    assert record["phi"] == patient


async def test_fail_closed_an_unwritable_audit_trail_answers_ar_never_aa(
        gateway: RunningGateway) -> None:
    # The audit database turning read-only under the running gateway, as a full or
    # failed disk would: every append now fails inside SQLite.
    store = audit_of(gateway).store
    await store._db.execute("PRAGMA query_only = ON")  # type: ignore[attr-defined]
    peer = await MllpPeer.open(gateway.mllp_port)
    ack = segments(await peer.request(with_control_id(ADT, "NO-AUDIT-1")))
    assert ack["MSA"][0][1:3] == ["AR", "NO-AUDIT-1"]
    assert ack["ERR"][0][3].startswith("207^")
    assert "audit trail; resend later" in ack["ERR"][0][8]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.http_url}/readyz") as response:
            assert response.status == 503
            assert (await response.json())["status"] == "audit trail not writable"
    await store._db.execute("PRAGMA query_only = OFF")  # type: ignore[attr-defined]
    # The message was stored; the resend is answered (as a duplicate) and on record.
    ack = segments(await peer.request(with_control_id(ADT, "NO-AUDIT-1")))
    assert ack["MSA"][0][1] == "AA"
    await peer.close()
    found = [r for r in await records(gateway) if r["control_id"] == "NO-AUDIT-1"]
    assert [r["outcome"] for r in found] == ["success"]


async def test_no_audit_record_no_positive_ack_under_concurrency(
        gateway: RunningGateway) -> None:
    store = audit_of(gateway).store
    peers = await asyncio.gather(*(MllpPeer.open(gateway.mllp_port) for _ in range(16)))
    await store._db.execute("PRAGMA query_only = ON")  # type: ignore[attr-defined]
    acks = await asyncio.gather(*(p.request(with_control_id(ADT, f"CONC-{i}"))
                                  for i, p in enumerate(peers)))
    assert {segments(a)["MSA"][0][1] for a in acks} == {"AR"}
    await store._db.execute("PRAGMA query_only = OFF")  # type: ignore[attr-defined]
    await asyncio.gather(*(p.close() for p in peers))


async def test_the_audit_database_holds_no_phi_in_plain_text(tmp_path: Path) -> None:
    gw = await start_gateway(tmp_path / "var")
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        for i in range(5):
            await peer.request(with_control_id(ADT, f"CANARY-{i}"))
        await peer.request(b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|X|P|9.9\rPID|1||MRN-100001^^^H||"
                           b"CANARYFAMILY^Jane\r")
        await peer.close()
    finally:
        await gw.runner.cleanup()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "var").glob(AUDIT_DB + "*"))
    assert b"CANARY-4" in raw  # control ids are there: the file is the right one
    for canary in PHI:
        assert canary.encode() not in raw, canary


async def test_no_phi_in_logs_or_spans_of_audited_traffic(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    exporter = InMemorySpanExporter()
    gw = await start_gateway(tmp_path / "var", telemetry=configure("none",
                                                                   span_exporter=exporter))
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        await peer.request(with_control_id(ADT, "SPAN-AUDIT"))
        await peer.request(b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|X|P|9.9\rPID|1||MRN-100001||"
                           b"CANARYFAMILY^Jane\r")
        await peer.close()
        await audit_of(gw).store._db.execute(  # type: ignore[attr-defined]
            "PRAGMA query_only = ON")
        peer = await MllpPeer.open(gw.mllp_port)
        await peer.request(with_control_id(ADT, "SPAN-FAIL"))
        await peer.close()
    finally:
        await gw.runner.cleanup()
    spans = exporter.get_finished_spans()
    assert "audit.append" in {s.name for s in spans}
    dumped = json.dumps([json.loads(s.to_json()) for s in spans]) + caplog.text
    assert "audit commit failed" in caplog.text
    for canary in PHI:
        assert canary not in dumped


async def test_mtls_certificate_subject_is_recorded(tmp_path: Path, pki: Pki) -> None:
    async with tls_gateway(tmp_path, pki, **mtls(pki)) as gw:
        ack = await exchange(gw.mllp_port, with_control_id(ADT, "TLS-AUDIT"), lab(pki))
        assert ack["MSA"][0][1] == "AA"
        (record,) = await records(gw)
        # RFC 4514: the lab certificate's RDN sequence is CN, O; the last RDN comes first.
        assert record["tls_subject"] == "O=Synthetic Lab,CN=lab.example"


async def test_operator_reading_a_stored_message_is_on_record(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    await peer.request(with_control_id(ADT, "SHOWN-1"))
    await peer.close()
    code, out, _ = run_cli("inbox", "--data-dir", str(gateway.data_dir), "show", "1")
    assert code == 0 and CANARY_FAMILY in out
    read = [r for r in await records(gateway) if r["action"] == "read"]
    assert len(read) == 1
    assert read[0]["client"] == "isthmus-cli" and read[0]["type"] == "hl7v2-message"
    assert read[0]["phi"] == f"SYNTHHOSP|{CANARY_MRN}"


async def test_reading_a_stored_message_is_refused_when_it_cannot_be_recorded(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    await peer.request(with_control_id(ADT, "SHOWN-2"))
    await peer.close()
    (gateway.data_dir / "keys" / "audit-data.keys").rename(gateway.data_dir / "moved.keys")
    code, out, err = run_cli("inbox", "--data-dir", str(gateway.data_dir), "show", "1")
    assert code == 1
    assert "could not be recorded in the audit trail" in err
    assert CANARY_FAMILY not in out + err


async def test_audit_can_be_switched_off(tmp_path: Path) -> None:
    gw = await start_gateway(tmp_path / "var", **{"audit.enabled": False})
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        assert segments(await peer.request(ADT))["MSA"][0][1] == "AA"
        await peer.close()
        assert AUDIT not in gw.app
    finally:
        await gw.runner.cleanup()
    assert not (tmp_path / "var" / AUDIT_DB).exists()


async def test_replaying_a_stored_message_is_on_record_as_a_translation(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    await peer.request(with_control_id(ADT, "REPLAYED-1"))
    await peer.close()
    code, out, err = run_cli("inbox", "--data-dir", str(gateway.data_dir), "replay", "1")
    assert code == 0, err
    (replayed,) = [r for r in await records(gateway) if r["action"] == "translate"]
    assert replayed["outcome"] == "success" and replayed["type"] == "hl7v2-message"
    assert replayed["phi"] == f"SYNTHHOSP|{CANARY_MRN}"


async def test_a_large_frame_read_in_its_own_process_is_on_record_with_its_patient(
        tmp_path: Path) -> None:
    # offload_bytes 0: every frame goes to the large-frame process, and the edge reads only
    # its MSH; the patient (PID-3) of the record and the content digest come from there.
    gateway = await start_gateway(tmp_path / "var", **{"processes.offload_bytes": 0})
    try:
        peer = await MllpPeer.open(gateway.mllp_port)
        raw = with_control_id(ADT, "LARGE-AUDIT-1")
        assert segments(await peer.request(raw))["MSA"][0][1] == "AA"
        # The same control id, other content: a conflict, on record with its patient too.
        other = raw.replace(b"CANARYFAMILY", b"OTHERFAMILY")
        assert segments(await peer.request(other))["MSA"][0][1] == "AE"
        await peer.close()
        # The conflict's own record (how it was answered) is written after its AE, which
        # does not wait for it (the access is on record already): read until it is there.
        found: list[dict[str, Any]] = []
        for _ in range(100):
            found = [r for r in await records(gateway) if r["control_id"] == "LARGE-AUDIT-1"]
            if len(found) >= 3:
                break
            await asyncio.sleep(0.05)
        assert [r["phi"] for r in found] == [f"SYNTHHOSP|{CANARY_MRN}"] * 3
        assert [r["detail"] for r in found][-1] == "control id conflict"
        with sqlite3.connect(gateway.data_dir / "inbox.db") as db:
            hashes = [r[0] for r in db.execute(
                "SELECT content_hash FROM inbox WHERE control_id = 'LARGE-AUDIT-1' "
                "ORDER BY id")]
        assert hashes == [content_digest(parse_message(raw)),
                          content_digest(parse_message(other))]
    finally:
        await gateway.runner.cleanup()
