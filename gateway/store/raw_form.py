"""How the inbox stores a message's raw bytes: as received, or compressed.

A large frame (the large-frame process's, `processes.offload_bytes` or more) is stored
zlib-compressed: its commit holds the inbox's one writer for as long as it writes, and a
sealed data dir encrypts every byte on the edge's event loop, so ~10x fewer bytes is
~10x less of both. The compression is done in the large-frame process, never on the loop.

The stored form describes itself: an accepted message begins with "MSH", a UTF-8
byte-order mark or blank characters (`hl7.message._header_offset`), never a NUL byte, so a
value beginning with `MAGIC` is the compressed form and any other value is the message
as received (every row stored before this existed). Sealing wraps the stored form:
compress, then seal; open, then `original`.
"""

from __future__ import annotations

import zlib

MAGIC = b"\x00z1"
# Level 1: most of the size for a fraction of the time (HL7 text compresses ~10x).
_LEVEL = 1


def packed(raw: bytes) -> bytes:
    """The compressed stored form of `raw` (done where a large frame is inspected)."""
    return MAGIC + zlib.compress(raw, _LEVEL)


def original(stored: bytes) -> bytes:
    """The message as received, from a stored (already opened) `raw` value of either form.
    Every reader of the inbox's `raw` column goes through this."""
    if stored.startswith(MAGIC):
        return zlib.decompress(memoryview(stored)[len(MAGIC):])
    return stored
