"""Paging cursors: a backend's continuation, kept opaque to the caller.

A remote backend's `next` link is its own (Cerner's `-pageContext`, Epic's session ids);
the facade hands the caller a cursor instead: the backend's link and the caller's search,
sealed with AES-256-GCM under a key of this gateway (derived from the audit signing key
when there is one, so instances that share it share cursors; else the process's own).
The client id is the associated data, so a cursor opens only for the client it was
issued to; it carries its expiry. A caller learns nothing of the backend's URL, and
cannot forge or widen one.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.policy.errors import CursorRefused

_VERSION = b"\x01"
_NONCE_BYTES = 12
_AAD = b"isthmus-page-cursor-v1:"
DEFAULT_LIFETIME = 600.0
# A cursor longer than this is refused before it is decoded (URLs stay within 8 KiB).
MAX_CURSOR_CHARS = 6000


class PageCursors:
    """Seals and opens the facade's paging cursors with one AES-256 key."""

    def __init__(self, key: bytes | None = None, lifetime: float = DEFAULT_LIFETIME,
                 clock: Callable[[], float] = time.time) -> None:
        """`key`: 32 bytes (random when not given: the cursors of one process)."""
        self._cipher = AESGCM(key if key is not None else secrets.token_bytes(32))
        self.lifetime = lifetime
        self._clock = clock

    @classmethod
    def derived(cls, secret: bytes, lifetime: float = DEFAULT_LIFETIME) -> PageCursors:
        """Cursors under a key derived (HKDF-SHA256) from a secret the gateway already
        keeps, so that instances sharing it open each other's cursors."""
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"isthmus-page-cursor-v1").derive(secret)
        return cls(key, lifetime)

    def seal(self, client_id: str, content: dict[str, Any]) -> str:
        """A cursor for this client holding `content` (JSON-able), expiring later."""
        body = orjson.dumps({"exp": int(self._clock() + self.lifetime), "c": content})
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._cipher.encrypt(nonce, body, _AAD + client_id.encode())
        return base64.urlsafe_b64encode(_VERSION + nonce + sealed).rstrip(b"=").decode()

    def open(self, client_id: str, cursor: str) -> dict[str, Any]:
        """The content of a cursor issued to this client; CursorRefused otherwise."""
        if len(cursor) > MAX_CURSOR_CHARS:
            raise CursorRefused("the paging cursor is too long")
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except (binascii.Error, ValueError):
            raise CursorRefused("the paging cursor is not one of this gateway's") from None
        if len(raw) < 1 + _NONCE_BYTES + 16 or raw[:1] != _VERSION:
            raise CursorRefused("the paging cursor is not one of this gateway's")
        nonce, sealed = raw[1:1 + _NONCE_BYTES], raw[1 + _NONCE_BYTES:]
        try:
            body = self._cipher.decrypt(nonce, sealed, _AAD + client_id.encode())
        except InvalidTag:
            # Forged, changed, issued by another gateway process, or to another client:
            # all alike to the caller.
            raise CursorRefused("the paging cursor was not issued to this client by this "
                                "gateway") from None
        document = orjson.loads(body)
        if not isinstance(document, dict) or not isinstance(document.get("c"), dict):
            raise CursorRefused("the paging cursor is not one of this gateway's")
        if int(document.get("exp", 0)) <= self._clock():
            raise CursorRefused("the paging cursor has expired; search again")
        content: dict[str, Any] = document["c"]
        return content
