"""Sealing PHI at rest: AES-256-GCM envelopes around payload columns, blind indexes for
exact-match search (docs/encryption.md says why this and not page-level encryption).

A sealed value is `MAGIC | key id length | key id | 12-byte nonce | ciphertext+tag`. The
key id travels with the value, so keys rotate like the audit keys: every key in the ring
opens, the newest (last listed) seals. The associated data binds a value to the row it
belongs to (table, column and the row's identity), so a value copied onto another row does
not open: it fails loudly, never as another patient's data.

A blind index is a keyed MAC of a normalised value: equal values, equal tags, and no way
back to the value without the key. Blind indexes are computed with one key, the index key
the data dir's marker names (the first key it was sealed with), so that an old row and a
new one of the same value still match after the sealing key rotates.

Stores take a `RowCodec`: `PLAIN` (a data dir made before encryption, or with encryption
off) leaves values as they are; `SealedCodec` seals, opens and blinds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.store.errors import StoreError

# NUL first: neither an HL7 message ('MSH') nor a JSON document ('{') starts with it.
MAGIC = b"\x00isl1"
_NONCE = 12
_AAD_PREFIX = b"isthmus-store-v1\x1f"
_BLIND_BYTES = 16
# Blind values a codec keeps of each kind (see `SealedCodec.__init__`): ~3 MB at most.
_BLINDS_KEPT = 4096


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _kept(kept: dict[K, V], key: K, value: V) -> V:
    """`value`, kept under `key` in a codec's map of blind values: bounded by count,
    emptied when full (values seen once, an MRN, would only age out anyway)."""
    if len(kept) >= _BLINDS_KEPT:
        kept.clear()
    kept[key] = value
    return value


class SealError(StoreError):
    """A stored value cannot be opened (or a key is missing); the text holds no value."""


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"isthmus-store-" + purpose).derive(secret)


@dataclass(frozen=True)
class DataKey:
    """One AES-256 data key: the subkey that seals and the one that blinds."""

    id: str
    cipher: AESGCM = field(repr=False)
    index_key: bytes = field(repr=False)

    @classmethod
    def from_secret(cls, key_id: str, secret: bytes) -> DataKey:
        if len(secret) != 32:
            raise SealError(f"store data key '{key_id}' is not 32 bytes (AES-256)")
        if not key_id or len(key_id.encode()) > 255:
            raise SealError("a store data key id is 1-255 bytes")
        return cls(key_id, AESGCM(_derive(secret, b"seal-v1")),
                   _derive(secret, b"blind-v1"))


@dataclass(frozen=True)
class KeyRing:
    """Data keys, oldest first: the last seals, every one opens."""

    keys: tuple[DataKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise SealError("no store data keys")
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise SealError("store data key ids must be unique")

    @property
    def current(self) -> DataKey:
        return self.keys[-1]

    def get(self, key_id: str) -> DataKey | None:
        return next((k for k in self.keys if k.id == key_id), None)


class RowCodec(Protocol):
    """What a store does at its column boundary: seal on the way in, open on the way out,
    and blind the values its exact-match indexes hold."""

    @property
    def sealed(self) -> bool: ...

    def seal(self, value: bytes, context: str) -> bytes: ...

    def open(self, value: bytes, context: str) -> bytes: ...

    def blind(self, value: str, purpose: str) -> str: ...


class PlainCodec:
    """A data dir without encryption: values as they are. A sealed value met here means the
    keys are not configured (or the marker was removed): an error, never ciphertext served."""

    sealed = False

    def seal(self, value: bytes, context: str) -> bytes:
        return value

    def open(self, value: bytes, context: str) -> bytes:
        if value.startswith(MAGIC):
            raise SealError("a stored value is sealed but this data dir is opened without "
                            "its data keys (see docs/encryption.md)")
        return value

    def blind(self, value: str, purpose: str) -> str:
        return value


PLAIN = PlainCodec()


class SealedCodec:
    """AES-256-GCM under the ring's newest key; blind indexes under the index key.

    `accept_plain` is for `isthmus store encrypt` only: a value not yet sealed is read as
    it is (the migration seals it); everywhere else an unsealed value is an error, so a
    plaintext value written over a sealed one is noticed.
    """

    sealed = True

    def __init__(self, ring: KeyRing, index_key_id: str, *, accept_plain: bool = False) -> None:
        index = ring.get(index_key_id)
        if index is None:
            raise SealError(f"the blind index key '{index_key_id}' is not in the store "
                            "data keys")
        self.ring = ring
        self.index_key_id = index_key_id
        self._accept_plain = accept_plain
        # Keyed BLAKE2b is a MAC (RFC 7693 §2.9) and, copied from a keyed state, several
        # times cheaper per value than hmac.new: a sealed Bundle blinds hundreds of values.
        self._blind = hashlib.blake2b(key=index.index_key, digest_size=_BLIND_BYTES)
        # Blind values made lately, by (purpose, value): a city, a given name, a state or a
        # code recurs in message after message, and its MACs (a string's 8 prefixes and its
        # exact value: ~4 us) were a tenth of the apply worker's Python (`_kept`).
        self._blinded: dict[tuple[str, str], str] = {}
        self._prefixed: dict[tuple[str, str], tuple[str, ...]] = {}
        # The ring's keys by their ids' bytes, as a sealed value names them.
        self._keys = {key.id.encode(): key for key in ring.keys}
        current = ring.current
        self._header = MAGIC + bytes([len(current.id.encode())]) + current.id.encode()
        self._cipher = current.cipher

    def seal(self, value: bytes, context: str) -> bytes:
        nonce = os.urandom(_NONCE)
        return (self._header + nonce
                + self._cipher.encrypt(nonce, value, _AAD_PREFIX + context.encode()))

    def open(self, value: bytes, context: str) -> bytes:
        if not value.startswith(MAGIC):
            if self._accept_plain:
                return value
            raise SealError("a stored value is not sealed in an encrypted data dir "
                            "(written by something else?)")
        start = len(MAGIC)
        if len(value) < start + 1:
            raise SealError("a sealed value is cut short")
        end = start + 1 + value[start]
        key = self._keys.get(bytes(value[start + 1:end])) or self.ring.get(
            value[start + 1:end].decode("utf-8", "replace"))
        if key is None:
            raise SealError(f"a stored value is sealed with data key "
                            f"'{value[start + 1:end].decode('utf-8', 'replace')[:40]}', "
                            "which is not loaded")
        try:
            return key.cipher.decrypt(value[end:end + _NONCE], value[end + _NONCE:],
                                      _AAD_PREFIX + context.encode())
        except (InvalidTag, ValueError):
            raise SealError("a stored value does not open: altered, moved from another "
                            "row, or sealed under another key with the same id") from None

    def blind(self, value: str, purpose: str) -> str:
        key = (purpose, value)
        blinded = self._blinded.get(key)
        if blinded is None:
            mac = self._blind.copy()
            mac.update(purpose.encode() + b"\x1f" + value.encode())
            blinded = _kept(self._blinded, key, mac.hexdigest())
        return blinded

    def blind_prefixes(self, value: str, purpose: str, longest: int) -> tuple[str, ...]:
        """`blind(value[:n], purpose)` for n = 1 .. min(len(value), longest), hashed
        incrementally (one update a character, not one MAC a prefix)."""
        value = value[:longest]  # all it depends on: "family12" of every "family12..."
        key = (purpose, value)
        blinded = self._prefixed.get(key)
        if blinded is None:
            mac = self._blind.copy()
            mac.update(purpose.encode() + b"\x1f")
            made = []
            for character in value:
                mac.update(character.encode())
                made.append(mac.copy().hexdigest())
            blinded = _kept(self._prefixed, key, tuple(made))
        return blinded

    def reading_plain(self) -> SealedCodec:
        """This codec, also reading values not sealed yet (the migration's)."""
        return SealedCodec(self.ring, self.index_key_id, accept_plain=True)


def is_sealed(value: bytes | None) -> bool:
    return value is not None and bytes(value[:len(MAGIC)]) == MAGIC


def sealed_key_id(value: bytes | None) -> str | None:
    """The id of the key a sealed value names; None for a value not sealed."""
    if value is None or not is_sealed(value) or len(value) <= len(MAGIC):
        return None
    start = len(MAGIC) + 1
    return bytes(value[start:start + value[start - 1]]).decode("utf-8", "replace")


# -- the associated data of each sealed column: the row's identity ----------------------


def inbox_context(column: str, application: str, facility: str, control_id: str,
                  received_at: str) -> str:
    """An inbox payload (`raw` or `bundle`): the sender, control id and receipt time name
    the row (its integer id is not known until the INSERT returns it)."""
    return f"inbox.{column}\x1f{application}\x1f{facility}\x1f{control_id}\x1f{received_at}"


def fhir_context(resource_type: str, id: str, version: int) -> str:
    """A FHIR resource body, current or historical: one version of one resource."""
    return f"fhir\x1f{resource_type}\x1f{id}\x1f{version}"
