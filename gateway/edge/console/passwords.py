"""Console passwords as salted scrypt hashes (RFC 7914), checked in constant time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from functools import cache

# n=2^15, r=8, p=1: ~32 MiB and ~50 ms per check on this kind of machine; OWASP's floor.
_N, _R, _P = 1 << 15, 8, 1
_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM)
    return "$".join(("scrypt", str(n), str(r), str(p), base64.b64encode(salt).decode(),
                     base64.b64encode(digest).decode()))


def verify_password(password: str, stored: str) -> bool:
    """True if `password` matches `stored`; a malformed hash never matches."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                                r=int(r), p=int(p), maxmem=_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return kind == "scrypt" and hmac.compare_digest(actual, expected)


@cache
def dummy_hash() -> str:
    """A hash to check against when the user is unknown, so that the answer takes as long."""
    return hash_password(os.urandom(8).hex())
