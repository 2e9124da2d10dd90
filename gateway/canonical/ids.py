"""Deterministic ids: the same source always names the same record."""

from __future__ import annotations

import uuid

try:
    # CPython's own SHA-1, hashing namespace and name afresh, costs ~1.4k instructions less
    # an id than copying and finishing OpenSSL's state through hashlib; same digest.
    from _sha1 import sha1  # type: ignore[import-not-found]  # no stub; as hashlib.sha1
except ImportError:  # an interpreter built without it
    from hashlib import sha1

# uuid5 namespace for every id Isthmus derives (fixed forever: ids must stay stable).
ID_NAMESPACE = uuid.UUID("6c1d3f2e-6f0b-5e4a-9a57-1d2f0e8b4c11")
_NAMESPACE = ID_NAMESPACE.bytes
# RFC 4122 variant: the top two bits of the 17th hex digit are 10.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def name_uuid(name: str) -> str:
    """uuid.uuid5(ID_NAMESPACE, name) as text, without building UUID objects (hot path)."""
    h = sha1(_NAMESPACE + name.encode()).hexdigest()
    # The 13th hex digit is the version (5).
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"
