"""MLLP framing over real sockets: split, joined, stray bytes, oversize, idle, pipelining."""

from __future__ import annotations

import asyncio

import pytest

from conftest import MllpPeer, RunningGateway, message, segments, start_gateway, with_control_id
from gateway.hl7.mllp import FrameDecoder, FrameTooLarge, frame
from support.wait import eventually

ADT = message("adt_a01.hl7")


def msa(ack: bytes) -> list[str]:
    return segments(ack)["MSA"][0]


# -- the decoder alone ------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 4096])
def test_decoder_reassembles_frames_from_any_split(chunk: int) -> None:
    payloads = [with_control_id(ADT, f"SPLIT-{i}") for i in range(5)]
    stream = b"noise" + b"".join(frame(p) for p in payloads) + b"\r\n"
    decoder = FrameDecoder(1 << 20)
    out: list[bytes | FrameTooLarge] = []
    for i in range(0, len(stream), chunk):
        out.extend(decoder.feed(stream[i : i + chunk]))
    assert out == payloads
    assert decoder.skipped_bytes == len(b"noise") + 2


def test_decoder_end_block_split_between_reads() -> None:
    decoder = FrameDecoder(1024)
    assert decoder.feed(b"\x0bMSH|x\x1c") == []
    assert decoder.feed(b"\x0d") == [b"MSH|x"]


def test_decoder_lone_fs_inside_payload_is_data() -> None:
    decoder = FrameDecoder(1024)
    assert decoder.feed(b"\x0bab\x1ccd\x1c\x0d") == [b"ab\x1ccd"]


def test_decoder_new_start_block_abandons_partial_frame() -> None:
    decoder = FrameDecoder(1024)
    assert decoder.feed(b"\x0bpartial\x0bwhole\x1c\x0d") == [b"whole"]
    assert decoder.skipped_bytes == len(b"partial")


def test_decoder_oversize_frame_is_not_buffered() -> None:
    decoder = FrameDecoder(1024)
    out = decoder.feed(b"\x0bMSH|" + b"x" * 5000)
    assert len(out) == 1 and isinstance(out[0], FrameTooLarge)
    assert out[0].head.startswith(b"MSH|")
    decoder.feed(b"y" * 100_000)
    assert decoder.buffered == 0
    assert decoder.feed(b"\x1c\x0d\x0bok\x1c\x0d") == [b"ok"]


# -- over sockets -----------------------------------------------------------------------


async def test_frame_split_over_many_writes_is_acknowledged(gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    data = frame(with_control_id(ADT, "TRICKLE-1"))
    for i in range(0, len(data), 17):
        await peer.send_raw(data[i : i + 17])
        await asyncio.sleep(0)  # a slow sender: each piece goes out on its own
    assert msa(await peer.reply()) == ["MSA", "AA", "TRICKLE-1"]
    await peer.close()


async def test_pipelined_frames_in_one_write_answered_in_order(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    ids = [f"PIPE-{i:03d}" for i in range(50)]
    await peer.send_raw(b"".join(frame(with_control_id(ADT, c)) for c in ids))
    answered = [msa(await peer.reply())[2] for _ in ids]
    assert answered == ids
    await peer.close()


async def test_pipelined_errors_and_successes_keep_their_order(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    batch = [with_control_id(ADT, "ORDER-1"), b"not hl7 at all",
             with_control_id(ADT, "ORDER-2")]
    await peer.send_raw(b"".join(frame(p) for p in batch))
    codes = [msa(await peer.reply())[1:3] for _ in batch]
    assert codes == [["AA", "ORDER-1"], ["AR", ""], ["AA", "ORDER-2"]]
    await peer.close()


async def test_bytes_outside_frames_are_skipped(gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    await peer.send_raw(b"\r\n garbage \r\n" + frame(with_control_id(ADT, "AFTER-NOISE")))
    assert msa(await peer.reply())[1:3] == ["AA", "AFTER-NOISE"]
    await peer.close()
    await eventually(lambda: gateway.mllp.connection_count == 0, what="the close, seen")
    assert gateway.mllp.skipped_bytes == len(b"\r\n garbage \r\n")


async def test_oversize_frame_refused_with_ar_and_connection_still_usable(
        tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    gw = await start_gateway(tmp_path / "var", **{"mllp.max_frame_bytes": 4096})
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        big = with_control_id(ADT, "TOO-BIG") + b"NTE|1||" + b"x" * 20_000 + b"\r"
        ack = await peer.request(big)
        parts = segments(ack)
        assert parts["MSA"][0][1:3] == ["AR", "TOO-BIG"]
        assert "4096 byte limit" in ack.decode()
        assert await gw.inbox.count() == 0
        assert msa(await peer.request(with_control_id(ADT, "SMALL-1")))[1] == "AA"
        await peer.close()
    finally:
        await gw.runner.cleanup()


async def test_idle_connection_is_closed(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    gw = await start_gateway(tmp_path / "var", **{"mllp.idle_timeout": 0.3})
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        assert await peer.closed_by_peer(timeout=5)
    finally:
        await gw.runner.cleanup()


async def test_slow_client_does_not_block_others(gateway: RunningGateway) -> None:
    slow = await MllpPeer.open(gateway.mllp_port)
    # Half a frame, then silence: this connection's frame never completes.
    await slow.send_raw(frame(with_control_id(ADT, "SLOW-1"))[:40])
    fast = await MllpPeer.open(gateway.mllp_port)
    for i in range(20):
        assert msa(await fast.request(with_control_id(ADT, f"FAST-{i}")))[1] == "AA"
    await slow.send_raw(frame(with_control_id(ADT, "SLOW-1"))[40:])
    assert msa(await slow.reply())[1:3] == ["AA", "SLOW-1"]
    await fast.close()
    await slow.close()


async def test_client_that_never_reads_acks_does_not_block_others(
        gateway: RunningGateway) -> None:
    hog = await MllpPeer.open(gateway.mllp_port)
    # Pipeline far more than the in-flight limit without reading a single ACK.
    payload = b"".join(frame(with_control_id(ADT, f"HOG-{i}")) for i in range(2000))
    hog.writer.write(payload)
    other = await MllpPeer.open(gateway.mllp_port)
    # Not blocked means answered at all: it may queue behind the hog's in-flight messages
    # in the shared group commit, which on a loaded CI machine takes seconds, not forever.
    assert msa(await other.request(with_control_id(ADT, "OTHER-1"), timeout=120))[1] == "AA"
    await other.close()
    hog.writer.transport.abort()


@pytest.mark.slow
async def test_many_concurrent_connections(gateway: RunningGateway) -> None:
    peers = await asyncio.gather(*(MllpPeer.open(gateway.mllp_port) for _ in range(2000)))

    async def one(i: int, peer: MllpPeer) -> str:
        return msa(await peer.request(with_control_id(ADT, f"CONC-{i}"), timeout=30))[1]

    codes = await asyncio.gather(*(one(i, p) for i, p in enumerate(peers)))
    assert codes == ["AA"] * 2000
    assert await gateway.inbox.count() == 2000
    await asyncio.gather(*(p.close() for p in peers))


async def test_connections_beyond_the_limit_are_refused_others_keep_working(
        tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    gw = await start_gateway(tmp_path / "var", **{"mllp.max_connections": 5})
    try:
        peers = [await MllpPeer.open(gw.mllp_port) for _ in range(5)]
        await eventually(lambda: gw.mllp.connection_count == 5, what="5 connections, accepted")
        extra = await MllpPeer.open(gw.mllp_port)
        try:
            assert await extra.closed_by_peer(timeout=5)
        except ConnectionResetError:
            pass  # an abort may arrive as a reset: refused either way
        assert msa(await peers[0].request(with_control_id(ADT, "WITHIN-LIMIT")))[1] == "AA"
        for peer in peers:
            await peer.close()
    finally:
        await gw.runner.cleanup()


async def test_unfinished_frames_across_connections_are_bounded_in_memory(
        tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    gw = await start_gateway(tmp_path / "var", **{"mllp.max_frame_bytes": 64 * 1024,
                                                  "mllp.max_buffered_bytes": 100 * 1024})
    try:
        first = await MllpPeer.open(gw.mllp_port)
        second = await MllpPeer.open(gw.mllp_port)
        body = b"NTE|1||" + b"x" * 60_000 + b"\r"
        first_frame = frame(with_control_id(ADT, "HELD-1") + body)
        second_frame = frame(with_control_id(ADT, "DROPPED-1") + body)
        await first.send_raw(first_frame[:-10])  # ~60 KiB held, unfinished
        await eventually(lambda: gw.mllp.buffered_bytes > 60_000, what="the first frame, held")
        await second.send_raw(second_frame[:-10])  # pushes the total past 100 KiB
        refused = segments(await second.reply())
        assert refused["MSA"][0][1:3] == ["AR", "DROPPED-1"]
        assert "resend later" in refused["ERR"][0][8]
        await second.send_raw(second_frame[-10:])  # the rest of the dropped frame: ignored
        assert msa(await second.request(with_control_id(ADT, "SMALL-2")))[1] == "AA"
        await first.send_raw(first_frame[-10:])  # the held frame completes normally
        assert msa(await first.reply())[1:3] == ["AA", "HELD-1"]
        assert gw.mllp.buffered_bytes == 0
        assert {r.control_id for r in await gw.inbox.list(10)} == {"HELD-1", "SMALL-2"}
        await first.close()
        await second.close()
    finally:
        await gw.runner.cleanup()
