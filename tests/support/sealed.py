"""Reading what a gateway stored, through the data dir's own codec (sealed by default)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.app.sealing import store_codec
from gateway.config import load_settings
from gateway.store.sealing import RowCodec, inbox_context

# Synthetic PHI in tests/messages/canary_adt_a01.hl7 (names, identifier, street, city,
# phone, e-mail), lower-cased: none may appear in a sealed store's files.
ADT_CANARIES = (b"qzxcanaryfam", b"wqvcanarygiv", b"mrncanary77123", b"qzxcanary lane",
                b"vqwcanaryville", b"0173344", b"qzx.canary@example.invalid")


def codec_of(data_dir: Path, **overrides: object) -> RowCodec:
    """The codec the data dir is opened with (its default key file, or `overrides`)."""
    settings = load_settings(None, environ={},
                             overrides={"store.data_dir": data_dir, **overrides})
    return store_codec(settings)


def inbox_messages(data_dir: Path) -> list[tuple[str, bytes]]:
    """(control id, raw message) of every inbox row, oldest first, opened."""
    codec = codec_of(data_dir)
    with sqlite3.connect(data_dir / "inbox.db") as db:
        rows = db.execute("SELECT control_id, raw, sending_application, sending_facility, "
                          "received_at FROM inbox ORDER BY id").fetchall()
    return [(str(control), codec.open(bytes(raw), inbox_context(
        "raw", str(app), str(facility), str(control), str(received))))
        for control, raw, app, facility, received in rows]


def canaries_in_files(data_dir: Path, canaries: tuple[bytes, ...],
                      names: tuple[str, ...] = ("inbox.db", "fhir.db")) -> dict[str, list[str]]:
    """The canaries found, per database file and its -wal/-shm files (lower-cased bytes)."""
    found: dict[str, list[str]] = {}
    for name in names:
        for path in sorted(data_dir.glob(name + "*")):
            data = path.read_bytes().lower()
            hits = [c.decode() for c in canaries if c in data]
            if hits:
                found[path.name] = hits
    return found
