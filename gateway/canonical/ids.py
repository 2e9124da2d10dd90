"""Deterministic ids: the same source always names the same record."""

from __future__ import annotations

import hashlib
import uuid

# uuid5 namespace for every id Isthmus derives (fixed forever: ids must stay stable).
ID_NAMESPACE = uuid.UUID("6c1d3f2e-6f0b-5e4a-9a57-1d2f0e8b4c11")
_NAMESPACE_BYTES = ID_NAMESPACE.bytes


def name_uuid(name: str) -> str:
    """uuid.uuid5(ID_NAMESPACE, name) as text, without building UUID objects (hot path)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
