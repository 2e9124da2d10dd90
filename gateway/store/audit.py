"""The audit trail's persistence interface: the rows the audit layer hands over and reads
back, the `Chain` it links them with, and the `AuditStore` protocol.

What the hashes are is the audit layer's business: it hands the store a `Chain`.
`SqliteAuditStore` (`audit_sqlite.py`) is the embedded implementation; a PostgreSQL one
would take the head row `FOR UPDATE` in the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

# ChainConflict is defined in errors.py; imported here too for the old import path.
from gateway.store.errors import ChainConflict as ChainConflict


class Chain(Protocol):
    """How records are linked and sealed; defined by the audit layer."""

    @property
    def genesis(self) -> bytes:
        """The hash the first record links to."""

    @property
    def mac_key_id(self) -> str:
        """Names the secret `mac` uses, stored beside each MAC."""

    def link(self, prev: bytes, seq: int, body: bytes) -> bytes:
        """The chain hash of record `seq` with this body after a record hashed `prev`."""

    def mac(self, link: bytes) -> bytes:
        """A keyed MAC over a chain hash: only the key holder can extend the chain."""

    def extend(self, prev: bytes, first_seq: int,
               bodies: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
        """(chain hash, MAC) of consecutive records from `first_seq` on, after `prev`."""


class AuditRow(NamedTuple):
    """A sealed record as the audit layer hands it over: search columns and the body."""

    recorded_at: str
    action: str
    client_id: str
    outcome: str
    patient_index: bytes | None
    patient_id_index: bytes | None
    body: bytes


class StoredAuditRow(NamedTuple):
    """One row of the log, as read back."""

    seq: int
    recorded_at: str
    action: str
    client_id: str
    outcome: str
    patient_index: bytes | None
    patient_id_index: bytes | None
    body: bytes
    hash: bytes
    mac: bytes
    mac_key: str


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    """A signed checkpoint as stored: its canonical body and signature."""

    id: int
    count: int
    created_at: str
    body: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Search conditions; every given one must hold. Times are the stored text form."""

    start: str | None = None
    end: str | None = None
    client_id: str | None = None
    # Also match client ids that begin with this plus '|' (an application, any facility).
    client_prefix: str | None = None
    action: str | None = None
    # Blind indexes under each data key; a full reference gives both, a bare id one.
    patient_indexes: tuple[bytes, ...] = ()
    patient_id_indexes: tuple[bytes, ...] = ()
    max_seq: int | None = None


class AuditStore(Protocol):
    """What the audit log needs from its persistence."""

    @property
    def log_id(self) -> str: ...

    async def start(self, chain: Chain,
                    on_commit: Callable[[int, int], None] | None = None) -> None: ...

    def submit(self, row: AuditRow) -> asyncio.Future[tuple[int, bytes]]: ...

    @property
    def head(self) -> tuple[int, bytes]: ...

    async def last_row(self) -> StoredAuditRow | None: ...

    async def sync_head(self) -> tuple[int, bytes]: ...

    async def stop_writer(self) -> None: ...

    async def add_checkpoint(self, count: int, created_at: str, body: bytes,
                             signature: bytes) -> int: ...

    async def purge(self, through_seq: int, count: int, created_at: str, body: bytes,
                    signature: bytes) -> int: ...

    async def checkpoints(self, low: int = 0, high: int | None = None, *,
                          newest_first: bool = False,
                          limit: int | None = None) -> list[CheckpointRow]: ...

    async def checkpoint_counts(self, low: int = 0, high: int | None = None) -> list[int]: ...

    async def hash_at(self, seq: int) -> bytes | None: ...

    async def first_seq_at_or_after(self, recorded_at: str) -> int | None: ...

    def scan(self, from_seq: int = 1, to_seq: int | None = None,
             page: int = 2000) -> AsyncIterator[StoredAuditRow]: ...

    async def search(self, where: AuditFilter, after_seq: int = 0,
                     limit: int = 100) -> list[StoredAuditRow]: ...

    async def probe_writable(self) -> None: ...

    async def close(self) -> None: ...
