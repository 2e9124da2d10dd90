"""Deterministic ids: the same source always names the same record."""

from __future__ import annotations

import hashlib
import uuid

# uuid5 namespace for every id Isthmus derives (fixed forever: ids must stay stable).
ID_NAMESPACE = uuid.UUID("6c1d3f2e-6f0b-5e4a-9a57-1d2f0e8b4c11")
# The SHA-1 state after the namespace: each id copies it rather than hashing it again.
_NAMESPACE_HASH = hashlib.sha1(ID_NAMESPACE.bytes)
# RFC 4122 variant: the top two bits of the 17th hex digit are 10.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def name_uuid(name: str) -> str:
    """uuid.uuid5(ID_NAMESPACE, name) as text, without building UUID objects (hot path)."""
    sha = _NAMESPACE_HASH.copy()
    sha.update(name.encode())
    h = sha.hexdigest()
    # The 13th hex digit is the version (5).
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"
