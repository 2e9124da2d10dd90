"""Nothing acknowledged is lost, nothing is stored twice: inbox, duplicates, store failure."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from conftest import MllpPeer, RunningGateway, message, segments, start_gateway, with_control_id
from gateway.hl7.mllp import frame
from gateway.store.inbox import InboundMessage
from gateway.store.inbox_sqlite import SqliteInbox
from support.sealed import inbox_messages

ADT = message("adt_a01.hl7")


def inbox_rows(data_dir: Path) -> list[tuple[str, bytes]]:
    return inbox_messages(data_dir)


async def test_positive_ack_only_after_the_raw_message_is_in_the_inbox(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    raw = with_control_id(ADT, "DURABLE-1")
    ack = await peer.request(raw)
    assert segments(ack)["MSA"][0][1] == "AA"
    # A separate connection to the file sees the committed row, byte for byte.
    assert inbox_rows(gateway.data_dir) == [("DURABLE-1", raw)]
    await peer.close()


async def test_duplicate_control_id_gets_same_ack_and_is_stored_once(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    raw = with_control_id(ADT, "DUP-1")
    first = await peer.request(raw)
    second = await peer.request(raw)
    assert first == second
    assert [c for c, _ in inbox_rows(gateway.data_dir)] == ["DUP-1"]
    await peer.close()


async def test_concurrent_duplicates_in_one_group_commit_store_once(
        gateway: RunningGateway) -> None:
    peers = await asyncio.gather(*(MllpPeer.open(gateway.mllp_port) for _ in range(10)))
    raw = with_control_id(ADT, "DUP-RACE")
    acks = await asyncio.gather(*(p.request(raw) for p in peers))
    assert len(set(acks)) == 1
    assert [c for c, _ in inbox_rows(gateway.data_dir)] == ["DUP-RACE"]
    await asyncio.gather(*(p.close() for p in peers))


async def test_same_control_id_from_another_sender_is_not_a_duplicate(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    raw = with_control_id(ADT, "SHARED-1")
    other = raw.replace(b"|SYNTHLAB|", b"|OTHERLAB|", 1)
    await peer.request(raw)
    await peer.request(other)
    assert [c for c, _ in inbox_rows(gateway.data_dir)] == ["SHARED-1", "SHARED-1"]
    await peer.close()


async def test_duplicate_control_id_gets_same_ack_after_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    raw = with_control_id(ADT, "RESTART-1")
    first_gateway = await start_gateway(data_dir)
    peer = await MllpPeer.open(first_gateway.mllp_port)
    first = await peer.request(raw)
    await peer.close()
    await first_gateway.runner.cleanup()

    second_gateway = await start_gateway(data_dir)
    try:
        peer = await MllpPeer.open(second_gateway.mllp_port)
        assert await peer.request(raw) == first
        await peer.close()
        assert await second_gateway.inbox.count() == 1
    finally:
        await second_gateway.runner.cleanup()


async def test_duplicate_window_expires(tmp_path: Path) -> None:
    inbox = await SqliteInbox.open(tmp_path / "inbox.db", "normal", timedelta(days=7))
    try:
        old = InboundMessage("APP", "FAC", "OLD-1", "ADT^A01", "2.5", "peer", b"MSH|1",
                             b"ACK-old", datetime.now(UTC) - timedelta(days=8))
        assert not (await inbox.accept(old)).duplicate
        again = InboundMessage("APP", "FAC", "OLD-1", "ADT^A01", "2.5", "peer", b"MSH|2",
                               b"ACK-new", datetime.now(UTC))
        stored = await inbox.accept(again)
        assert not stored.duplicate and stored.ack == b"ACK-new"
        assert await inbox.count() == 2
        recent = await inbox.accept(again)
        assert recent.duplicate and recent.ack == b"ACK-new"
        assert await inbox.expire_dedup_keys() == 0
    finally:
        await inbox.close()


async def test_store_failure_answers_ar_and_never_aa(gateway: RunningGateway) -> None:
    # The database turning read-only under the running gateway, as a full or failed disk
    # would: every write now fails inside SQLite.
    await gateway.inbox._db.execute("PRAGMA query_only = ON")
    peer = await MllpPeer.open(gateway.mllp_port)
    ack = segments(await peer.request(with_control_id(ADT, "NO-STORE-1")))
    assert ack["MSA"][0][1:3] == ["AR", "NO-STORE-1"]
    assert ack["ERR"][0][3].startswith("207^")
    assert "resend later" in ack["ERR"][0][8]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.http_url}/readyz") as response:
            assert response.status == 503
    await gateway.inbox._db.execute("PRAGMA query_only = OFF")
    assert segments(await peer.request(with_control_id(ADT, "NO-STORE-1")))["MSA"][0][1] == "AA"
    await peer.close()


async def test_group_commit_batches_concurrent_messages(gateway: RunningGateway) -> None:
    peers = await asyncio.gather(*(MllpPeer.open(gateway.mllp_port) for _ in range(64)))
    before = gateway.inbox.batches_committed
    await asyncio.gather(*(p.request(with_control_id(ADT, f"GROUP-{i}"))
                           for i, p in enumerate(peers)))
    assert await gateway.inbox.count() == 64
    # 64 concurrent messages must not cost 64 commits.
    assert gateway.inbox.batches_committed - before < 64
    await asyncio.gather(*(p.close() for p in peers))


async def test_messages_in_flight_are_answered_on_shutdown(tmp_path: Path) -> None:
    gw = await start_gateway(tmp_path / "var")
    peer = await MllpPeer.open(gw.mllp_port)
    ids = [f"INFLIGHT-{i}" for i in range(200)]
    await peer.send_raw(b"".join(frame(with_control_id(ADT, c)) for c in ids))
    await asyncio.sleep(0.01)  # deliberate: shut down with messages still in flight
    await gw.runner.cleanup()
    answered = []
    try:
        while True:
            answered.append(segments(await peer.reply(timeout=5))["MSA"][0][2])
    except (ConnectionError, TimeoutError):
        pass
    stored = [c for c, _ in inbox_rows(tmp_path / "var")]
    # Every ACK that went out is for a stored message, in order; nothing stored twice.
    assert answered == ids[: len(answered)]
    assert set(answered) <= set(stored)
    assert len(stored) == len(set(stored))
    await peer.close()


async def test_large_messages_are_committed_in_bounded_batches(tmp_path: Path) -> None:
    inbox = await SqliteInbox.open(tmp_path / "inbox.db", "normal")
    try:
        big = b"MSH|" + b"x" * (9 * 1024 * 1024)
        messages = [InboundMessage("APP", "FAC", f"BIG-{i}", "ORU^R01", "2.5", "peer", big,
                                   b"ACK", datetime.now(UTC)) for i in range(8)]
        stored = await asyncio.gather(*(inbox.accept(m) for m in messages))
        assert [s.duplicate for s in stored] == [False] * 8
        assert await inbox.count() == 8
        # 72 MiB cannot go in one 32 MiB-bounded commit.
        assert inbox.batches_committed >= 3
    finally:
        await inbox.close()
