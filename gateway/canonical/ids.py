"""Deterministic ids: the same source always names the same record."""

from __future__ import annotations

import uuid
from hashlib import sha1
from operator import itemgetter

# hashlib's SHA-1 (OpenSSL's), not CPython's own `_sha1`: ~370 ns an id against ~670 on
# this machine's CPU. Under valgrind the order reverses (~1.4k instructions more), as
# OpenSSL there cannot use the CPU's SHA instructions: a case where instruction counts
# mislead, so this is timed (bench/README.md, ninth session).

# uuid5 namespace for every id Isthmus derives (fixed forever: ids must stay stable).
ID_NAMESPACE = uuid.UUID("6c1d3f2e-6f0b-5e4a-9a57-1d2f0e8b4c11")
_NAMESPACE = ID_NAMESPACE.bytes
# RFC 4122 variant: the top two bits of the 17th hex digit are 10.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


# The hex digest's parts: in one C call, not five slices made and applied one by one.
_PARTS = itemgetter(slice(0, 8), slice(8, 12), slice(13, 16), 16, slice(17, 20), slice(20, 32))


def name_uuid(name: str) -> str:
    """uuid.uuid5(ID_NAMESPACE, name) as text, without building UUID objects (hot path)."""
    # The 13th hex digit (left out) is the version: 5.
    time_low, time_mid, time_high, variant, clock_seq, node = _PARTS(
        sha1(_NAMESPACE + name.encode()).hexdigest())
    return f"{time_low}-{time_mid}-5{time_high}-{_VARIANT[variant]}{clock_seq}-{node}"
