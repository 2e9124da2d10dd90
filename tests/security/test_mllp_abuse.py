"""The MLLP edge under abuse: slow senders cannot hold the connection slots (issue 13
item 14), and a reused control id cannot hide a different message behind the first one's
AA (item 15).

Real gateways on 127.0.0.1, real sockets, real SQLite files; synthetic messages only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import MllpPeer, RunningGateway, message, segments, start_gateway, with_control_id
from gateway.app.files import INBOX_FILE
from gateway.store.inbox_sqlite import read_entries
from gateway.telemetry import configure
from support.cli import isthmus
from support.pki import Pki, intruder, lab
from support.tls import close, exchange, mtls, open_tls, tls_gateway

ADT = message("adt_a01.hl7")  # MSH-3 SYNTHLAB, MSH-4 SYNTHHOSP; PID-5 CANARYFAMILY
LAB_SUBJECT = "O=Synthetic Lab,CN=lab.example"  # RFC 4514: the last RDN of the DER first
MSH7 = b"20261126083000+0100"


def msa(ack: bytes) -> list[str]:
    return segments(ack)["MSA"][0]


def metric_points(reader: InMemoryMetricReader) -> dict[tuple[str, tuple[Any, ...]], float]:
    points: dict[tuple[str, tuple[Any, ...]], float] = {}
    data = reader.get_metrics_data()
    if data is None:
        return points
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, tuple(sorted(point.attributes.items())))
                    points[key] = getattr(point, "value", getattr(point, "count", 0))
    return points


async def eventually(check: Any, timeout: float = 10.0) -> None:
    """Poll `check()` until it is true; fail after `timeout` seconds (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"not true within {timeout} s: {check.__doc__ or check}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def metered_gateway(tmp_path: Path, **overrides: Any
                          ) -> AsyncIterator[tuple[RunningGateway, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    gw = await start_gateway(tmp_path / "var", telemetry=configure(
        "none", span_exporter=InMemorySpanExporter(), metric_reader=reader), **overrides)
    try:
        yield gw, reader
    finally:
        await gw.runner.cleanup()


async def trickle(peer: MllpPeer, stop: asyncio.Event) -> None:
    """A slow-loris sender: a start block and MSH, then one byte at a time, forever."""
    with contextlib.suppress(OSError):
        await peer.send_raw(b"\x0bMSH|")
        while not stop.is_set():
            await peer.send_raw(b"x")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)


# -- item 14: slow senders --------------------------------------------------------------


async def test_fifty_trickling_senders_are_evicted_and_a_legitimate_sender_is_answered(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with metered_gateway(tmp_path, **{
            "mllp.max_connections": 50, "mllp.frame_deadline": 1.5,
            "mllp.min_bytes_per_second": 1000, "mllp.rate_window": 30}) as (gw, reader):
        stop = asyncio.Event()
        loris = [await MllpPeer.open(gw.mllp_port) for _ in range(50)]
        tasks = [asyncio.create_task(trickle(peer, stop)) for peer in loris]
        try:
            await eventually(lambda: gw.mllp.connection_count == 50)
            # Every slot is held: today a legitimate sender is closed with no answer.
            await eventually(lambda: gw.mllp.connection_count == 0)
            peer = await MllpPeer.open(gw.mllp_port)
            try:
                assert msa(await peer.request(with_control_id(ADT, "AFTER-LORIS")))[1:3] == [
                    "AA", "AFTER-LORIS"]
            finally:
                await peer.close()
            for slow in loris:  # each trickler was closed by the gateway
                with contextlib.suppress(ConnectionResetError):
                    assert await slow.closed_by_peer(timeout=5)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            for slow in loris:
                await slow.close()
        points = metric_points(reader)
    assert points[("isthmus.mllp.evictions",
                   (("mllp.eviction_reason", "frame_deadline"),))] == 50
    evictions = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
    assert len(evictions) == 50 and all("127.0.0.1:" in line for line in evictions)


async def test_a_sender_below_the_minimum_rate_is_evicted_before_the_frame_deadline(
        tmp_path: Path) -> None:
    async with metered_gateway(tmp_path, **{
            "mllp.frame_deadline": 60, "mllp.min_bytes_per_second": 1000,
            "mllp.rate_window": 0.5}) as (gw, reader):
        stop = asyncio.Event()
        slow = await MllpPeer.open(gw.mllp_port)
        task = asyncio.create_task(trickle(slow, stop))
        try:
            with contextlib.suppress(ConnectionResetError):
                assert await slow.closed_by_peer(timeout=10)
        finally:
            stop.set()
            await task
            await slow.close()
        # A sender at full speed in the same gateway is answered, in many small writes.
        fast = await MllpPeer.open(gw.mllp_port)
        try:
            data = b"\x0b" + with_control_id(ADT, "FAST-1") + b"\x1c\x0d"
            for i in range(0, len(data), 16):
                await fast.send_raw(data[i:i + 16])
            assert msa(await fast.reply())[1] == "AA"
        finally:
            await fast.close()
        points = metric_points(reader)
    assert points[("isthmus.mllp.evictions", (("mllp.eviction_reason", "min_rate"),))] == 1


async def test_a_reserved_slot_keeps_an_allowed_sender_in_when_others_fill_the_rest(
        tmp_path: Path, pki: Pki) -> None:
    rules = {"mllp.max_connections": 3, "mllp.tls.allowed_senders": [
        {"subject": LAB_SUBJECT, "sending_application": "SYNTHLAB",
         "reserved_connections": 1}]}
    async with tls_gateway(tmp_path, pki, **mtls(pki, **rules)) as gw:
        # A CA-signed certificate with no rule takes the two unreserved slots ...
        others = [await open_tls(gw.mllp_port, intruder(pki)) for _ in range(2)]
        try:
            await asyncio.wait_for(others[1].writer.drain(), 5)
            third = await open_tls(gw.mllp_port, intruder(pki))
            try:  # ... and not the last one, which is the lab's.
                with contextlib.suppress(ConnectionResetError):
                    assert await third.closed_by_peer(timeout=5)
            finally:
                await close(third)
            ack = await exchange(gw.mllp_port, with_control_id(ADT, "RESERVED-1"), lab(pki))
            assert (ack["MSA"][0][1], ack["MSA"][0][2]) == ("AA", "RESERVED-1")
        finally:
            for peer in others:
                await close(peer)


async def test_a_client_that_never_reads_its_acks_is_evicted_after_the_idle_timeout(
        tmp_path: Path) -> None:
    import socket

    from gateway.hl7.mllp import frame

    async with metered_gateway(tmp_path, **{"mllp.idle_timeout": 1.0}) as (gw, reader):
        # Small socket buffers on both ends, so unread ACKs back up after a few hundred
        # messages rather than after megabytes of kernel buffers.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.mllp_port))
        _, writer = await asyncio.open_connection(sock=sock)
        try:
            await eventually(lambda: gw.mllp.connection_count == 1)
            (conn,) = list(gw.mllp._connections)
            conn._transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            writer.write(b"".join(frame(with_control_id(ADT, f"HOG-{i}"))
                                  for i in range(1500)))  # and never read an ACK

            def evicted() -> bool:
                """the client was evicted for unread ACKs"""
                return metric_points(reader).get((
                    "isthmus.mllp.evictions",
                    (("mllp.eviction_reason", "unread_acks"),))) == 1

            await eventually(evicted, timeout=60)
            await eventually(lambda: gw.mllp.connection_count == 0)
        finally:
            writer.transport.abort()


def test_reservations_cannot_exceed_the_connection_limit() -> None:
    from gateway.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="reserve 3 connections, more than max_connections"):
        load_settings(None, environ={}, overrides={
            "mllp.max_connections": 2, "mllp.tls.require_client_cert": True,
            "mllp.tls.client_ca_file": "/nonexistent/ca.pem",
            "mllp.tls.allowed_senders": [{"subject": LAB_SUBJECT, "sending_application": "A",
                                          "reserved_connections": 3}]})


# -- item 15: a reused control id ---------------------------------------------------------


@pytest.mark.parametrize(("change", "same"), [
    ((MSH7, b"20261126090000+0100"), True),   # a resend stamped anew
    ((b"20261126082900\r", b"20261126082900\r\r\n"), True),  # trailing line ends
    ((b"MSH|", b"\r\nMSH|"), True),           # blank lines before MSH
    ((b"CANARYFAMILY^Jane", b"CANARYFAMILY^Joan"), False),
    ((b"|ADT^A01^ADT_A01|", b"|ADT^A08^ADT_A01|"), False),
    ((b"20261126082900+0100", b"20261126082901+0100"), False),  # EVN-2 is not MSH-7
])
def test_the_content_hash_ignores_msh7_only(change: tuple[bytes, bytes], same: bool) -> None:
    from gateway.hl7.message import content_digest, parse_message

    changed = ADT.replace(*change, 1)
    assert changed != ADT
    digest = content_digest(parse_message(ADT))
    assert (content_digest(parse_message(changed)) == digest) is same


def inbox_rows(data_dir: Path) -> list[tuple[int, str, str]]:
    with sqlite3.connect(data_dir / INBOX_FILE) as db:
        return [(int(r[0]), str(r[1]), str(r[2])) for r in db.execute(
            "SELECT id, control_id, status FROM inbox ORDER BY id")]


async def test_a_different_message_under_a_used_control_id_is_kept_and_answered_ae(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    first = with_control_id(ADT, "REUSED-1")
    # A sender whose counter reset: the same MSH-3/4/10, another patient's message.
    other = first.replace(b"CANARYFAMILY^Jane", b"CANARYFAMILY^Joan")
    assert other != first
    async with metered_gateway(tmp_path) as (gw, reader):
        peer = await MllpPeer.open(gw.mllp_port)
        try:
            accepted = await peer.request(first)
            assert msa(accepted)[1:3] == ["AA", "REUSED-1"]
            answered = segments(await peer.request(other))
            # An identical resend (only MSH-7 differs) is still the duplicate of the first.
            resent = await peer.request(first.replace(MSH7, b"20261126090000+0100"))
        finally:
            await peer.close()
        assert answered["MSA"][0][1:3] == ["AE", "REUSED-1"]
        (err,) = answered["ERR"]
        assert err[2] == "MSH^1^10" and err[3].startswith("205^")
        assert resent == accepted

        rows = inbox_rows(gw.data_dir)
        assert [(c, s) for _, c, s in rows][1] == ("REUSED-1", "conflict")
        conflict_id = rows[1][0]
        assert len(rows) == 2
        points = metric_points(reader)
        assert points[("isthmus.mllp.control_id_conflicts", ())] == 1
        assert points[("isthmus.mllp.messages",
                       (("hl7.ack_code", "AE"), ("hl7.message_type", "ADT^A01")))] == 1

        # The audit trail says how the conflict was answered, not only that it arrived.
        from gateway.audit.query import AuditQuery
        from gateway.audit.sealed import parse_body
        from gateway.edge.audit_http import AUDIT

        async def answered_conflicts() -> list[dict[str, Any]]:
            rows = await gw.app[AUDIT].search(AuditQuery(), limit=100)
            return [b for b in map(parse_body, (r.body for r in rows))
                    if b.get("detail") == "control id conflict"]

        for _ in range(100):  # its record is not awaited by the answer
            if await answered_conflicts():
                break
            await asyncio.sleep(0.05)
        (noted,) = await answered_conflicts()
        assert noted["outcome"] == "AE:205" and noted["control_id"] == "REUSED-1"

        data_dir = str(gw.data_dir)
        code, listing, err_text = await isthmus("inbox", "--data-dir", data_dir, "list",
                                                "--status", "conflict")
        assert code == 0, err_text
        listed = [line.split()[0] for line in listing.splitlines()[1:]]
        assert listed == [str(conflict_id)] and "CANARY" not in listing
        code, out, err_text = await isthmus("inbox", "--data-dir", data_dir, "replay",
                                            str(conflict_id))
        assert code == 0 and out.strip() == f"{conflict_id} translated", (out, err_text)
    conflicts = [r.getMessage() for r in caplog.records if "control id" in r.getMessage()
                 and "conflict" in r.getMessage()]
    assert conflicts and "REUSED-1" in conflicts[0]
    assert not any("CANARY" in r.getMessage() for r in caplog.records)


async def test_a_reused_control_id_in_enhanced_mode_gets_ce_and_the_resend_is_not_stored_twice(
        gateway: RunningGateway) -> None:
    first = with_control_id(ADT, "REUSED-ENH").replace(b"|2.5.1||||||", b"|2.5.1|||AL|||", 1)
    assert b"|AL|" in first
    other = first.replace(b"CANARYFAMILY^Jane", b"CANARYFAMILY^Joan")
    peer = await MllpPeer.open(gateway.mllp_port)
    try:
        assert msa(await peer.request(first))[1] == "CA"
        conflict = await peer.request(other)
        assert msa(conflict)[1:3] == ["CE", "REUSED-ENH"]
        assert segments(conflict)["ERR"][0][2] == "MSH^1^10"
        # The same conflicting message again gets the same answer and is not kept twice.
        assert await peer.request(other) == conflict
    finally:
        await peer.close()
    statuses = [s for _, _, s in inbox_rows(gateway.data_dir)]
    assert statuses.count("conflict") == 1 and len(statuses) == 2


OLD_INBOX = """
CREATE TABLE inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, received_at TEXT NOT NULL,
    sending_application TEXT NOT NULL, sending_facility TEXT NOT NULL,
    control_id TEXT NOT NULL, message_type TEXT NOT NULL, version TEXT NOT NULL,
    peer TEXT NOT NULL, size INTEGER NOT NULL, status TEXT NOT NULL, raw BLOB NOT NULL,
    ack BLOB NOT NULL, error TEXT NOT NULL DEFAULT '', dedup_key TEXT UNIQUE,
    routes TEXT NOT NULL DEFAULT '', patient_key TEXT NOT NULL DEFAULT '',
    trace TEXT NOT NULL DEFAULT '', bundle BLOB);
"""


async def test_an_existing_inbox_gains_the_hash_and_its_old_rows_keep_todays_dedup(
        tmp_path: Path) -> None:
    from datetime import UTC, datetime

    data_dir = tmp_path / "var"
    data_dir.mkdir()
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    with sqlite3.connect(data_dir / INBOX_FILE) as db:
        db.executescript(OLD_INBOX)
        db.execute(
            "INSERT INTO inbox (received_at, sending_application, sending_facility, "
            "control_id, message_type, version, peer, size, status, raw, ack, dedup_key) "
            "VALUES (?, 'SYNTHLAB', 'SYNTHHOSP', 'OLD-1', 'ADT^A01', '2.5.1', 'p', 1, "
            "'accepted', x'00', CAST('OLD-ACK' AS BLOB), ?)",
            (now, "SYNTHLAB\x1fSYNTHHOSP\x1fOLD-1"))
    gw = await start_gateway(data_dir)
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        try:  # a row stored without a hash: answered as a duplicate, as before
            assert await peer.request(with_control_id(ADT, "OLD-1")) == b"OLD-ACK"
            assert msa(await peer.request(with_control_id(ADT, "NEW-1")))[1] == "AA"
        finally:
            await peer.close()
    finally:
        await gw.runner.cleanup()
    with sqlite3.connect(data_dir / INBOX_FILE) as db:
        hashes = dict(db.execute("SELECT control_id, content_hash FROM inbox"))
    assert hashes["OLD-1"] is None and len(hashes["NEW-1"]) == 64
    entries = await read_entries(data_dir / INBOX_FILE)
    assert {e.control_id for e in entries} == {"OLD-1", "NEW-1"}


def test_replaying_a_conflict_row_owes_it_to_every_backend_of_its_route() -> None:
    from datetime import UTC, datetime

    from gateway.forward.routes import Route, Router
    from gateway.ingest.replay import replay_routed
    from support.mapping import translator

    router = Router((Route(to=("ehr", "lab"), message="ADT^*"),), {"ehr": "fhir", "lab": "mllp"})
    received = datetime(2026, 11, 26, 7, 30, tzinfo=UTC)
    raw = with_control_id(ADT, "REUSED-ROUTED")
    # A row routed at ingest already went to the MLLP backend; a conflict row went nowhere.
    assert replay_routed(translator(), router, 1, raw, received).routes == ("ehr",)
    replayed = replay_routed(translator(), router, 2, raw, received, routed=False)
    assert replayed.status == "routed" and replayed.routes == ("ehr", "lab")
    assert replayed.bundle is not None and replayed.patient_key


async def test_stray_bytes_between_frames_do_not_keep_a_connection_open(
        tmp_path: Path) -> None:
    async with metered_gateway(tmp_path, **{"mllp.idle_timeout": 0.5}) as (gw, _):
        stop = asyncio.Event()
        peer = await MllpPeer.open(gw.mllp_port)

        async def stray() -> None:
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    await peer.send_raw(b"\r\n")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.1)

        task = asyncio.create_task(stray())
        try:
            with contextlib.suppress(ConnectionResetError):
                assert await peer.closed_by_peer(timeout=5)
        finally:
            stop.set()
            await task
            await peer.close()


async def test_different_messages_racing_under_one_control_id_get_one_aa_and_ae_for_the_rest(
        gateway: RunningGateway) -> None:
    first = with_control_id(ADT, "REUSED-RACE")
    variants = [first] + [first.replace(b"CANARYFAMILY^Jane", f"CANARYFAMILY^J{i}".encode())
                          for i in range(4)]
    peers = await asyncio.gather(*(MllpPeer.open(gateway.mllp_port) for _ in variants))
    try:
        acks = await asyncio.gather(*(p.request(v) for p, v in zip(peers, variants,
                                                                     strict=True)))
    finally:
        await asyncio.gather(*(p.close() for p in peers))
    codes = sorted(msa(ack)[1] for ack in acks)
    assert codes == ["AA", "AE", "AE", "AE", "AE"]
    statuses = [s for _, _, s in inbox_rows(gateway.data_dir)]
    assert len(statuses) == 5 and statuses.count("conflict") == 4
