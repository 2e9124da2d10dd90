"""The hash chain and the signed checkpoints that pin it.

Record n's hash is SHA-256(hash of record n-1 || n as 8 bytes big-endian || SHA-256(body
of record n)); record 1 links to a genesis hash derived from the log's id. Changing,
removing, reordering or inserting a record breaks the chain from that record on. Linking
over the body's digest rather than the body lets an export prove the chain through records
it does not show, without showing them.

Anyone can recompute SHA-256, so the chain alone does not stop a rewrite of the tail. Two
things do: checkpoints (count, head hash, time) signed with Ed25519, and a MAC on every
record under a key derived from the signing key, which covers the records written since
the last checkpoint. A retention purge leaves a checkpoint carrying the hash of the last
purged record, from which the remaining chain continues.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.audit.keys import SigningKey
from gateway.audit.sealed import canonical

CHECKPOINT_DOMAIN = b"isthmus-audit-checkpoint-v1\x00"
EXPORT_DOMAIN = b"isthmus-audit-export-v1\x00"
_GENESIS_DOMAIN = b"isthmus-audit-genesis-v1\x00"


def genesis(log_id: str) -> bytes:
    return hashlib.sha256(_GENESIS_DOMAIN + log_id.encode()).digest()


def digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def link(prev: bytes, seq: int, body_digest: bytes) -> bytes:
    return hashlib.sha256(prev + seq.to_bytes(8, "big") + body_digest).digest()


class Chain:
    """The chain of one log, as the store's writer applies it."""

    def __init__(self, log_id: str, signing: SigningKey) -> None:
        self.log_id = log_id
        self._genesis = genesis(log_id)
        self._mac_key = signing.mac_key
        self._mac_key_id = signing.id

    @property
    def genesis(self) -> bytes:
        return self._genesis

    @property
    def mac_key_id(self) -> str:
        return self._mac_key_id

    def link(self, prev: bytes, seq: int, body: bytes) -> bytes:
        return link(prev, seq, digest(body))

    def mac(self, link: bytes) -> bytes:
        return hashlib.blake2b(link, key=self._mac_key, digest_size=32).digest()

    def extend(self, prev: bytes, first_seq: int,
               bodies: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
        """`link` and `mac` for a run of records, in one loop (the writer's hot path)."""
        sha256, blake2b, key = hashlib.sha256, hashlib.blake2b, self._mac_key
        out = []
        seq = first_seq
        for body in bodies:
            prev = sha256(prev + seq.to_bytes(8, "big") + sha256(body).digest()).digest()
            out.append((prev, blake2b(prev, key=key, digest_size=32).digest()))
            seq += 1
        return out


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement: log `log` had `count` records, the last hashing to `head`."""

    log: str
    count: int
    head: bytes
    time: str
    key: str
    # A retention purge removed records 1..purged; the last of them hashed to purged_head.
    purged: int = 0
    purged_head: bytes | None = None

    def body(self) -> bytes:
        value: dict[str, Any] = {"v": 1, "log": self.log, "count": self.count,
                                 "head": self.head.hex(), "time": self.time, "key": self.key}
        if self.purged:
            value["purged"] = self.purged
            value["purged_head"] = self.purged_head.hex() if self.purged_head else None
        return canonical(value)

    @classmethod
    def parse(cls, body: bytes) -> Checkpoint:
        value = orjson.loads(body)
        purged_head = value.get("purged_head")
        return cls(str(value["log"]), int(value["count"]), bytes.fromhex(value["head"]),
                   str(value["time"]), str(value["key"]), int(value.get("purged", 0)),
                   bytes.fromhex(purged_head) if purged_head else None)

    def sign(self, key: SigningKey) -> tuple[bytes, bytes]:
        body = self.body()
        return body, key.sign(CHECKPOINT_DOMAIN + body)


def check_signature(domain: bytes, body: bytes, signature: bytes, key: str,
                    trusted: Mapping[str, Ed25519PublicKey]) -> str | None:
    """None when `signature` over `body` verifies with trusted key `key`, else the reason."""
    public = trusted.get(key)
    if public is None:
        return f"signed with key {key}, which is not trusted here"
    try:
        public.verify(signature, domain + body)
    except InvalidSignature:
        return "its signature does not verify"
    return None


def open_checkpoint(body: bytes, signature: bytes,
                    trusted: Mapping[str, Ed25519PublicKey]) -> tuple[Checkpoint | None, str]:
    """The checkpoint if it is well formed and signed by a trusted key, else the reason."""
    try:
        checkpoint = Checkpoint.parse(body)
    except (ValueError, KeyError, TypeError):
        return None, "it is not a well-formed checkpoint"
    reason = check_signature(CHECKPOINT_DOMAIN, body, signature, checkpoint.key, trusted)
    if reason is not None:
        return None, reason
    return checkpoint, ""
