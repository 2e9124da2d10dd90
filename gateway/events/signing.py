"""Signing a delivery: HMAC-SHA256 over `<timestamp>.<body>`, as `t=<unix>,v1=<hex>`.

The timestamp is part of what is signed so that a receiver can refuse an old request
replayed later (docs/events.md has the receiver's recipe).
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Isthmus-Signature"
EVENT_ID_HEADER = "X-Isthmus-Event-Id"
EVENT_HEADER = "X-Isthmus-Event"


def signature(secret: bytes, body: bytes, timestamp: int | None = None) -> str:
    """The header value for `body` signed now (or at `timestamp`, unix seconds)."""
    stamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """Whether a header signs `body` with `secret` within `tolerance` seconds."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        stamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - stamp) > tolerance:
        return False
    expected = hmac.new(secret, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))
