"""The memory of large messages: bounded while held, given back once they are applied.

`isthmus serve` runs as a child process with a 64 MiB `processes.memory_budget_bytes`;
eight connections pipeline 4 MiB messages at it, more than the budget holds, so some are
answered AR "resend later" and resent. The edge's RSS is read from /proc (its own
process, not the test's): once every message is applied, the edge has given back at least
half of what the burst made it grow, where glibc's rising mmap threshold used to keep it
at its peak (issue 15: 2 GB after 80 messages of 10 MB, and it stayed there). Then
SIGTERM stops the edge and every process it started (apply worker, large-frame process).

A flood of 8 MiB frames (pipelined, or begun on sixteen connections at once) at a 32 MiB
budget pins the bound itself: the edge's peak RSS, sampled while it runs, stays within
the budget and a stated margin; every frame is answered (AA, or AR and resent), none is
lost, no connection is closed; the RSS comes back within 20% of its start.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from conftest import GatewayProcess, MllpPeer, message, segments, with_control_id
from gateway.hl7.mllp import frame
from support.wait import eventually

ADT = message("adt_a01.hl7")
MIB = 1024 * 1024
BUDGET = 64 * MIB
SIZE = 4 * MIB
CONNECTIONS = 8


def _padded(control_id: str, size: int = SIZE) -> bytes:
    """ADT^A01 grown to `size` bytes by a Z-segment (taken, stored, applied as any other)."""
    raw = with_control_id(ADT, control_id)
    return raw.rstrip(b"\r") + b"\rZPD|1|" + b"x" * (size - len(raw)) + b"\r"


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _all_applied(data_dir: Path, count: int) -> bool:
    with sqlite3.connect(data_dir / "inbox.db") as db:
        statuses = dict(db.execute("SELECT status, count(*) FROM inbox GROUP BY status"))
    return statuses == {"applied": count}


async def _pipeline(port: int, prefix: str, count: int, size: int = SIZE) -> list[str]:
    """Send `count` frames at once on one connection; resend those answered AR."""
    peer = await MllpPeer.open(port)
    codes: list[str] = []
    pending = [f"{prefix}-{n}" for n in range(count)]
    try:
        while pending:
            for control_id in pending:
                await peer.send(_padded(control_id, size))
            refused = []
            for control_id in pending:
                msa = segments(await peer.reply(timeout=300))["MSA"][0]
                assert msa[2] == control_id
                codes.append(msa[1])
                if msa[1] == "AR":
                    refused.append(control_id)
            pending = refused
    finally:
        await peer.close()
    return codes


async def _burst(port: int, name: str, per_connection: int, size: int = SIZE) -> list[str]:
    done = await asyncio.gather(*(_pipeline(port, f"{name}{c}", per_connection, size)
                                  for c in range(CONNECTIONS)))
    return [code for codes in done for code in codes]


@pytest.mark.slow
async def test_the_edge_gives_back_the_memory_of_a_burst_of_large_messages(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    gateway = GatewayProcess(data_dir, env={
        "ISTHMUS_STORE__SYNCHRONOUS": "normal",
        "ISTHMUS_MLLP__MAX_FRAME_BYTES": str(16 * MIB),
        "ISTHMUS_PROCESSES__MEMORY_BUDGET_BYTES": str(BUDGET)}).start(timeout=60)
    try:
        assert gateway.proc is not None
        pid = gateway.proc.pid
        # Warm-up of the same shape: the large-frame process, the apply worker, the
        # stores' caches and the tables are all up before the start is measured.
        await _burst(gateway.mllp_port, "W", 2)
        await eventually(lambda: _all_applied(data_dir, 2 * CONNECTIONS), timeout=120,
                         interval=0.2, what="the warm-up applied")
        start = _status_kib(pid, "VmRSS")

        codes = await _burst(gateway.mllp_port, "B", 5)
        # More than the budget was sent at once: some were refused, and taken when resent.
        assert "AR" in codes
        assert codes.count("AA") == 5 * CONNECTIONS
        await eventually(lambda: _all_applied(data_dir, 7 * CONNECTIONS), timeout=180,
                         interval=0.2, what="every message applied")
        peak = _status_kib(pid, "VmHWM")
        assert peak > start  # the burst did cost memory: what follows measures something

        # Once drained, at least half of what the burst added is given back.
        await eventually(lambda: _status_kib(pid, "VmRSS") - start <= (peak - start) / 2,
                         timeout=30, interval=0.5, what="the edge's RSS falling back")

        # SIGTERM stops every process: the apply worker and the large-frame process too.
        children = _children(pid)
        assert len(children) >= 2
        assert gateway.terminate(timeout=60) == 0
        await eventually(lambda: not any(_alive(c) for c in children), timeout=30,
                         interval=0.2, what="every child process of the gateway gone")
    finally:
        gateway.kill()


async def _peak_rss(pid: int, stop: asyncio.Event) -> int:
    """The highest VmRSS (KiB) read every 10 ms until `stop`."""
    peak = 0
    while not stop.is_set():
        peak = max(peak, _status_kib(pid, "VmRSS"))
        await asyncio.sleep(0.01)
    return peak


# What the edge may hold beyond its budget at the peak of a flood: copies the budget does
# not count, each of one frame at a time (the bytes made of a finished receive buffer;
# SQLite's record built from a bound blob while a commit runs; the pickled call the
# large-frame queue's feeder thread holds until its next; a receive buffer's last
# growth), the socket reads (256 KiB a connection), and the allocator's slack.
FLOOD_FRAME = 8 * MIB
FLOOD_MARGIN = 4 * FLOOD_FRAME + 8 * MIB
FLOOD_FRAMES = 2 * CONNECTIONS


async def _pipelined(port: int) -> list[str]:
    """Eight connections pipeline two frames each, resending those answered AR."""
    return await _burst(port, "F", FLOOD_FRAMES // CONNECTIONS, FLOOD_FRAME)


async def _begun_at_once(port: int) -> list[str]:
    """Sixteen connections each send 7/8 of a frame before any frame ends, then the rest:
    more unfinished frames at once than the budget holds. Those answered AR are resent."""
    ids = [f"B{n}" for n in range(FLOOD_FRAMES)]
    framed = [frame(_padded(control_id, FLOOD_FRAME)) for control_id in ids]
    cut = FLOOD_FRAME * 7 // 8
    peers = [await MllpPeer.open(port) for _ in ids]
    codes: list[str] = []
    try:
        for peer, data in zip(peers, framed, strict=True):
            await peer.send_raw(data[:cut])
        await asyncio.sleep(1)  # pacing (not a check): the edge reads the heads meanwhile
        for peer, data in zip(peers, framed, strict=True):
            await peer.send_raw(data[cut:])
        for peer, control_id in zip(peers, ids, strict=True):
            msa = segments(await peer.reply(timeout=300))["MSA"][0]
            assert msa[2] == control_id
            codes.append(msa[1])
    finally:
        for peer in peers:
            await peer.close()
    resend = await MllpPeer.open(port)  # lock-step, each until taken
    try:
        for control_id, code in zip(ids, list(codes), strict=True):
            while code == "AR":
                msa = segments(await resend.request(_padded(control_id, FLOOD_FRAME),
                                                    timeout=300))["MSA"][0]
                assert msa[2] == control_id
                code = msa[1]
                codes.append(code)
    finally:
        await resend.close()
    return codes


@pytest.mark.slow
@pytest.mark.parametrize("flood", [_pipelined, _begun_at_once])
async def test_a_flood_of_large_frames_stays_within_the_budget_and_every_frame_is_answered(
        tmp_path: Path, flood: Callable[[int], Awaitable[list[str]]]) -> None:
    # Sixteen 8 MiB frames, pipelined or begun at once, at a 32 MiB budget: the edge stops
    # reading while it is full and answers AR "resend later" to what it cannot hold,
    # never closing a connection (a reply on a closed one fails). The edge's RSS is read
    # every 10 ms while the flood runs.
    budget = 32 * MIB
    data_dir = tmp_path / "var"
    gateway = GatewayProcess(data_dir, env={
        "ISTHMUS_STORE__SYNCHRONOUS": "normal",
        "ISTHMUS_MLLP__MAX_FRAME_BYTES": str(16 * MIB),
        "ISTHMUS_PROCESSES__MEMORY_BUDGET_BYTES": str(budget)}).start(timeout=60)
    try:
        assert gateway.proc is not None
        pid = gateway.proc.pid
        # Warm-up of the same shape (past the budget too: refusals, their audit records).
        await _burst(gateway.mllp_port, "W", 1, FLOOD_FRAME)
        await eventually(lambda: _all_applied(data_dir, CONNECTIONS), timeout=120,
                         interval=0.2, what="the warm-up applied")
        start = _status_kib(pid, "VmRSS")

        stop = asyncio.Event()
        sampling = asyncio.create_task(_peak_rss(pid, stop))
        try:
            codes = await flood(gateway.mllp_port)
        finally:
            stop.set()
            peak = await sampling
        # Every frame answered AA in the end (resent after each AR), none lost.
        assert codes.count("AA") == FLOOD_FRAMES
        assert set(codes) <= {"AA", "AR"}
        await eventually(lambda: _all_applied(data_dir, CONNECTIONS + FLOOD_FRAMES),
                         timeout=180, interval=0.2, what="every message applied")
        assert (peak - start) * 1024 <= budget + FLOOD_MARGIN, (
            f"edge RSS rose {(peak - start) / 1024:.0f} MiB over a "
            f"{budget / MIB:.0f} MiB budget")

        # Drained: the edge is back within 20% of where it started.
        await eventually(lambda: _status_kib(pid, "VmRSS") <= 1.2 * start, timeout=30,
                         interval=0.5, what="the edge's RSS back within 20% of its start")
    finally:
        gateway.kill()


@pytest.mark.slow
async def test_a_gateway_killed_with_sigkill_leaves_no_child_process_behind(
        tmp_path: Path) -> None:
    # The large-frame process starts with the apply worker; a pool worker waits on a queue
    # whose write end it holds itself, so it would wait for ever once its gateway is gone.
    gateway = GatewayProcess(tmp_path / "var").start(timeout=60)
    try:
        assert gateway.proc is not None
        pid = gateway.proc.pid
        await eventually(lambda: len(_children(pid)) >= 2, timeout=60, interval=0.2,
                         what="the apply worker and the large-frame process started")
        children = _children(pid)
        gateway.kill()
        await eventually(lambda: not any(_alive(c) for c in children), timeout=30,
                         interval=0.2, what="every child process of the killed gateway gone")
    finally:
        gateway.kill()
