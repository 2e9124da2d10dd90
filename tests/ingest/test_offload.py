"""Translation off the event loop, the order it must keep, and the memory bound.

A frame at least `processes.offload_bytes` long is translated on a thread: a heavy message
(20,000 OBX) must not hold up another connection's ACK or /healthz; a connection's frames
still reach the inbox in the order they were sent; and the bytes held between receipt and
commit never pass `processes.memory_budget_bytes` (the frame that would is answered AR,
"resend later", and is taken when resent).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from conftest import MllpPeer, RunningGateway, message, segments, start_gateway, with_control_id
from gateway.ingest.protocol import frame_charge

ADT = message("adt_a01.hl7")
MIB = 1024 * 1024


def big_oru(observations: int, control_id: str = "BIG-ORU-1") -> bytes:
    """A legal ORU^R01 with this many OBX (about 250 bytes each)."""
    head = ("MSH|^~\\&|SYNTHLAB|SYNTHHOSP|ISTHMUS|GATEWAY|20261126083000||ORU^R01^ORU_R01|"
            f"{control_id}|P|2.5.1\r"
            "PID|1||MRN-BIG001^^^SYNTHHOSP^MR||BIGFAMILY^Jane||19800102|F\r"
            "OBR|1|PL-BIG|FL-BIG|24331-1^Lipid panel^LN|||20261126080000\r")
    note = "N" * 200
    obx = "".join(f"OBX|{n}|NM|2093-3^Cholesterol {note}^LN|{n}|180|mg/dL|<200|N|||F\r"
                  for n in range(1, observations + 1))
    return (head + obx).encode()


def padded_adt(control_id: str, size: int) -> bytes:
    """ADT^A01 grown to about `size` bytes by a Z-segment."""
    raw = with_control_id(ADT, control_id)
    return raw.rstrip(b"\r") + b"\rZPD|1|" + b"x" * max(0, size - len(raw)) + b"\r"


def inbox_order(data_dir: Path) -> list[str]:
    with sqlite3.connect(data_dir / "inbox.db") as db:
        return [str(r[0]) for r in db.execute("SELECT control_id FROM inbox ORDER BY id")]


async def test_a_connections_frames_are_committed_in_the_order_sent(tmp_path: Path) -> None:
    # offload_bytes 0: every frame is translated on a thread, and threads finish in any
    # order; the commits must not.
    gateway = await start_gateway(tmp_path / "var", **{"processes.offload_bytes": 0})
    try:
        peer = await MllpPeer.open(gateway.mllp_port)
        sent = [f"ORDER-{n:03d}" for n in range(30)]
        for n, control_id in enumerate(sent):
            # Sizes that vary, so translations take varying time.
            await peer.send(padded_adt(control_id, 400 + (n % 5) * 20_000))
        acks = [segments(await peer.reply(timeout=30))["MSA"][0][1:3] for _ in sent]
        await peer.close()
        assert acks == [["AA", c] for c in sent]
        assert inbox_order(gateway.data_dir) == sent
    finally:
        await gateway.runner.cleanup()


@pytest.mark.slow
async def test_a_heavy_message_holds_up_no_other_connections_ack_or_healthz(
        tmp_path: Path) -> None:
    gateway = await start_gateway(tmp_path / "var", **{"mllp.max_frame_bytes": 20 * MIB})
    try:
        heavy = big_oru(20_000)
        assert len(heavy) > 5_000_000
        sender = await MllpPeer.open(gateway.mllp_port)
        await sender.send(heavy)
        budget = gateway.mllp.ingest.budget
        # Received whole (an unfinished frame counts once), and being translated.
        while budget.held < frame_charge(len(heavy)):
            await asyncio.sleep(0.01)
        heavy_ack = asyncio.create_task(sender.reply(timeout=300))

        other = await MllpPeer.open(gateway.mllp_port)
        small = await other.request(with_control_id(ADT, "SMALL-1"), timeout=30)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.http_url}/healthz") as health:
                assert health.status == 200
        # Both answered while the heavy message was still being processed.
        assert not heavy_ack.done()
        assert segments(small)["MSA"][0][1] == "AA"
        assert segments(await heavy_ack)["MSA"][0][1:3] == ["AA", "BIG-ORU-1"]
        await sender.close()
        await other.close()
    finally:
        await gateway.runner.cleanup()


async def test_a_frame_over_the_memory_budget_is_answered_resend_later(
        tmp_path: Path) -> None:
    gateway = await start_gateway(tmp_path / "var", **{
        "processes.memory_budget_bytes": MIB})
    try:
        peer = await MllpPeer.open(gateway.mllp_port)
        refused = segments(await peer.request(padded_adt("HUGE-1", MIB + 1000)))
        assert refused["MSA"][0][1:3] == ["AR", "HUGE-1"]
        assert "resend later" in "|".join(refused["ERR"][0])
        # The budget was given back: the next message is taken.
        taken = segments(await peer.request(with_control_id(ADT, "AFTER-1")))
        assert taken["MSA"][0][1:3] == ["AA", "AFTER-1"]
        await peer.close()
        assert inbox_order(gateway.data_dir) == ["AFTER-1"]
    finally:
        await gateway.runner.cleanup()


async def _send_until_taken(gateway: RunningGateway, control_ids: list[str],
                            size: int) -> list[str]:
    """Lock-step on one connection, resending each message answered AR until AA."""
    peer = await MllpPeer.open(gateway.mllp_port)
    codes = []
    try:
        for control_id in control_ids:
            while True:
                code = segments(await peer.request(padded_adt(control_id, size),
                                                   timeout=60))["MSA"][0][1]
                codes.append(code)
                if code != "AR":
                    break
    finally:
        await peer.close()
    return codes


async def test_what_is_held_between_receipt_and_commit_stays_within_the_budget(
        tmp_path: Path) -> None:
    gateway = await start_gateway(tmp_path / "var", **{
        "processes.memory_budget_bytes": MIB, "processes.offload_bytes": 0})
    try:
        size = 300_000  # eight at once would hold 2.4 MB
        ids = [[f"BOUND-{c}-{n}" for n in range(4)] for c in range(8)]
        codes = await asyncio.gather(*(_send_until_taken(gateway, i, size) for i in ids))
        budget = gateway.mllp.ingest.budget
        assert budget.peak <= MIB
        assert budget.held == 0
        assert all(c[-1] == "AA" for c in codes)
        assert sorted(inbox_order(gateway.data_dir)) == sorted(sum(ids, []))
    finally:
        await gateway.runner.cleanup()
