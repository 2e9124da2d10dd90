"""A large frame's raw bytes are stored compressed, and every reader gets them back.

The large-frame process compresses a frame of `processes.offload_bytes` or more
(store/raw_form.py); the commit stores (and, sealed, encrypts) that. The `size` column
stays the frame's; the apply, replay and `inbox show` paths read the frame byte for byte;
a row stored as received (a small frame, or a row from before) reads as before.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_offload import big_oru

from conftest import MllpPeer, message, segments, start_gateway, with_control_id
from gateway.store.inbox_sqlite import read_entry, read_raw
from gateway.store.raw_form import MAGIC, original, packed
from support.sealed import codec_of
from support.wait import eventually

ADT = message("adt_a01.hl7")


def stored(data_dir: Path, control_id: str) -> tuple[int, bytes, int, str]:
    """(id, the raw column's bytes as on disk, the size column, status) of one row."""
    with sqlite3.connect(data_dir / "inbox.db") as db:
        row_id, raw, size, status = db.execute(
            "SELECT id, raw, size, status FROM inbox WHERE control_id = ?",
            (control_id,)).fetchone()
    return int(row_id), bytes(raw), int(size), str(status)


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "plaintext"])
async def test_a_large_frame_is_stored_compressed_and_read_back_whole(
        tmp_path: Path, sealed: bool) -> None:
    settings = {} if sealed else {"encryption.enabled": False}
    gateway = await start_gateway(tmp_path / "var", **settings)
    data_dir = gateway.data_dir
    heavy, small = big_oru(2_000, "BIG-PACKED-1"), with_control_id(ADT, "SMALL-AS-IS-1")
    assert len(heavy) > 400_000  # far over offload_bytes (64 KiB): the large-frame path
    try:
        peer = await MllpPeer.open(gateway.mllp_port)
        for raw in (heavy, small):
            assert segments(await peer.request(raw, timeout=60))["MSA"][0][1] == "AA"
        await peer.close()
        heavy_id, on_disk, size, _ = stored(data_dir, "BIG-PACKED-1")
        assert size == len(heavy)  # the frame's size, not the stored form's
        assert len(on_disk) < len(heavy) // 5
        if not sealed:
            assert on_disk.startswith(MAGIC)
        small_id, small_on_disk, _, _ = stored(data_dir, "SMALL-AS-IS-1")
        if not sealed:
            assert small_on_disk == small  # a small frame is stored as received
        # The worker's apply read the frame back (a garbled one would not translate).
        await eventually(lambda: stored(data_dir, "BIG-PACKED-1")[3] == "applied",
                         timeout=60)
    finally:
        await gateway.runner.cleanup()
    codec = codec_of(data_dir, **settings)
    # The replay / `inbox replay` path, and the `inbox show` path.
    rows = await read_raw(data_dir / "inbox.db", [heavy_id, small_id], codec=codec)
    assert [r[1] for r in rows] == [heavy, small]
    entry = await read_entry(data_dir / "inbox.db", heavy_id, codec)
    assert entry is not None and entry[1] == heavy


def test_a_value_as_received_reads_as_itself_and_a_packed_one_as_its_original() -> None:
    # What an older gateway stored (and a small frame now) begins with MSH, a BOM or a
    # blank, never the magic.
    for raw in (ADT, b"\xef\xbb\xbf" + ADT, b"\r\n" + ADT):
        assert original(raw) == raw
        assert original(packed(raw)) == raw
