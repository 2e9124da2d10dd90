"""Kill the gateway with SIGKILL mid-stream, restart, resend: every AA is stored exactly once.

Each run streams 2,000 messages over several connections into a gateway child process,
kills it at a random moment, restarts it on the same data directory, and resends every
message that did not get a positive ACK. Afterwards every positively acknowledged control
id is in the inbox exactly once, and so is every other message (resends are deduplicated).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from conftest import GatewayProcess, MllpPeer, message, segments, with_control_id
from support.wait import eventually

ADT = message("adt_a01.hl7")
TOTAL = 2000
CONNECTIONS = 8


async def _stream(port: int, pending: list[str], acked: set[str],
                  stop_after: float | None) -> None:
    """Send `pending` over several connections; record control ids answered AA."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for control_id in pending:
        queue.put_nowait(control_id)

    async def sender() -> None:
        try:
            peer = await MllpPeer.open(port)
        except OSError:
            return
        try:
            while not queue.empty():
                control_id = queue.get_nowait()
                ack = await peer.request(with_control_id(ADT, control_id), timeout=10)
                if segments(ack)["MSA"][0][1:3] == ["AA", control_id]:
                    acked.add(control_id)
        except (ConnectionError, TimeoutError, OSError, asyncio.IncompleteReadError):
            return
        finally:
            peer.writer.transport.abort()

    tasks = [asyncio.create_task(sender()) for _ in range(CONNECTIONS)]
    await asyncio.wait(tasks, timeout=stop_after)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _stored_counts(data_dir: Path) -> Counter[str]:
    with sqlite3.connect(data_dir / "inbox.db") as db:
        return Counter(str(r[0]) for r in db.execute("SELECT control_id FROM inbox"))


@pytest.mark.slow
@pytest.mark.parametrize("run", range(5))
async def test_sigkill_mid_stream_loses_and_doubles_nothing(tmp_path: Path, run: int) -> None:
    rng = random.Random(run)
    ids = [f"CRASH{run}-{i:05d}" for i in range(TOTAL)]
    acked: set[str] = set()
    # NORMAL is the weaker sync level; surviving SIGKILL with it implies FULL does too.
    gateway = GatewayProcess(tmp_path / "var",
                             extra_args=[], env={"ISTHMUS_STORE__SYNCHRONOUS": "normal"})
    gateway.start()
    try:
        # Kill once a random share has been acknowledged, with more messages in flight.
        kill_after = rng.randint(50, TOTAL - 200)
        stream = asyncio.create_task(_stream(gateway.mllp_port, ids, acked, None))
        await eventually(lambda: len(acked) >= kill_after or stream.done(), timeout=120,
                         interval=0.0005, what=f"{kill_after} ACKs")
        gateway.kill()
        await stream
        acked_before_crash = set(acked)
        assert 0 < len(acked_before_crash) < TOTAL, "the kill did not land mid-stream"

        gateway.start()
        remaining = [c for c in ids if c not in acked]
        await _stream(gateway.mllp_port, remaining, acked, None)
        # Resend a slice of already-acknowledged ones too: they must come back AA, not stored.
        resend = rng.sample(sorted(acked_before_crash), min(50, len(acked_before_crash)))
        await _stream(gateway.mllp_port, resend, acked, None)
    finally:
        gateway.kill()

    counts = _stored_counts(tmp_path / "var")
    assert acked == set(ids)
    assert all(counts[c] == 1 for c in acked_before_crash), "an acknowledged message was lost"
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1, "a message was stored twice"
