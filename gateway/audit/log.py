"""The audit log: the one way the gateway records access to PHI.

`submit` seals a record (PHI encrypted, canonical bytes) and queues it for the store's
group commit; the returned future resolves once the record is durable and chained, and
callers grant the access only then (fail closed). The log also signs checkpoints — every
`checkpoint_interval` seconds, every `checkpoint_every` records and on close — publishes
each outside the database (`publish.py`), and purges records past retention while
keeping the rest verifiable. At start it refuses a store that does not reach the heads it
published before (rolled back or truncated).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from opentelemetry import metrics

from gateway.audit.anchor import Head, published_line
from gateway.audit.chain import Chain, Checkpoint, digest, link, open_checkpoint

# AuditIntegrityError: defined in errors.py; imported here too for the old import path.
from gateway.audit.errors import AuditIntegrityError as AuditIntegrityError
from gateway.audit.keys import AuditKeyError, AuditKeys, SigningKey
from gateway.audit.patient import identifier_part, is_bare
from gateway.audit.publish import FilePublisher, Publisher, PublishError
from gateway.audit.query import AuditQuery
from gateway.audit.record import AuditRecord, now_timestamp, system_clock, timestamp
from gateway.audit.sealed import columns_match, parse_body, seal
from gateway.audit.verify import ChainVerifier, Report
from gateway.store.audit import AuditFilter, AuditStore, CheckpointRow, StoredAuditRow
from gateway.store.audit_sqlite import SqliteAuditStore, open_reader
from gateway.store.errors import StoreUnavailable
from gateway.telemetry.instruments import PerMeter

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.db"


class AuditCounts(PerMeter):
    """Records committed and lost, as plain counts read when metrics are collected: the
    SDK counter's add() after every group commit cost a durable FHIR read more than 2 %
    of its CPU (issue 15's profile). One set per meter, whichever logs share it."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.appended = self.failed = 0
        meter.create_observable_counter(
            "isthmus.audit.records", [lambda _: [metrics.Observation(self.appended)]],
            description="audit records committed")
        meter.create_observable_counter(
            "isthmus.audit.failures", [lambda _: [metrics.Observation(self.failed)]],
            description="audit records that could not be written")


class AuditLog:
    """Records accesses into an `AuditStore`; signs checkpoints; purges past retention."""

    def __init__(self, store: AuditStore, keys: AuditKeys, chain: Chain, *, server: str,
                 clock: Callable[[], datetime], checkpoint_interval: float,
                 checkpoint_every: int, meter: metrics.Meter | None,
                 publishers: Sequence[Publisher] = ()) -> None:
        if keys.ring is None:
            raise AuditKeyError("recording audit records needs the audit data keys")
        self._store = store
        self._keys = keys
        self._ring = keys.ring
        self._chain = chain
        self._server = server
        self._clock = clock
        # A record's time is the system clock's, read the cheap way, unless a clock is given.
        self._now: Callable[[], str] = (
            now_timestamp if clock is system_clock else lambda: timestamp(clock()))
        self._interval = checkpoint_interval
        self._every = checkpoint_every
        self._signed_count = 0
        self._purged = 0
        self._purged_head: bytes | None = None
        self._due = asyncio.Event()
        self._checkpoint_lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self._signs = False
        self._stopping = False
        self._publishers = tuple(publishers)
        self._publishing: set[asyncio.Task[None]] = set()
        meter = meter or metrics.NoOpMeter("isthmus")
        self._counts = AuditCounts.of(meter)
        self._publish_failed = meter.create_counter(
            "isthmus.audit.publish_failures",
            description="signed checkpoints that a publisher could not take")

    @classmethod
    async def open(
        cls,
        path: Path,
        keys: AuditKeys,
        *,
        synchronous: Literal["normal", "full", "extra"] = "full",
        max_batch: int = 1024,
        checkpoint_interval: float = 300.0,
        checkpoint_every: int = 10_000,
        server: str = "isthmus",
        clock: Callable[[], datetime] = system_clock,
        meter: metrics.Meter | None = None,
        checkpoints: bool = True,
        publishers: Sequence[Publisher] = (),
    ) -> AuditLog:
        """Open (creating) the log. With `checkpoints` (the gateway) the store is checked
        against the heads published before, a tail left unsigned by a crash is verified
        and signed, a timer signs from then on, and closing signs the head. Tools (the
        command line) pass False and sign only what they must. Every checkpoint signed is
        given to each of `publishers`."""
        store = await SqliteAuditStore.open(path, synchronous, max_batch)
        return await cls.open_store(
            store, keys, checkpoint_interval=checkpoint_interval,
            checkpoint_every=checkpoint_every, server=server, clock=clock, meter=meter,
            checkpoints=checkpoints, publishers=publishers)

    @classmethod
    async def open_store(
        cls,
        store: AuditStore,
        keys: AuditKeys,
        *,
        checkpoint_interval: float = 300.0,
        checkpoint_every: int = 10_000,
        server: str = "isthmus",
        clock: Callable[[], datetime] = system_clock,
        meter: metrics.Meter | None = None,
        checkpoints: bool = True,
        publishers: Sequence[Publisher] = (),
    ) -> AuditLog:
        """`open` over a store already opened (PostgreSQL's, shared by every instance);
        closing the log closes the store."""
        try:
            chain = Chain(store.log_id, keys.signing)
            await _check_sealing_key(store, keys)
            audit = cls(store, keys, chain, server=server, clock=clock,
                        checkpoint_interval=checkpoint_interval,
                        checkpoint_every=checkpoint_every, meter=meter,
                        publishers=publishers)
            await store.start(chain, audit._committed)
            await audit._load_checkpoints()
            if checkpoints:
                await audit._check_published()
                await audit.seal_head()
        except BaseException:
            await store.close()
            for publisher in publishers:
                await publisher.close()
            raise
        if checkpoints:
            audit._signs = True
            audit._timer = asyncio.create_task(audit._checkpoint_loop(),
                                               name="audit-checkpoints")
        return audit

    @property
    def store(self) -> AuditStore:
        return self._store

    @property
    def keys(self) -> AuditKeys:
        return self._keys

    @property
    def log_id(self) -> str:
        return self._store.log_id

    @property
    def server(self) -> str:
        return self._server

    # -- recording ----------------------------------------------------------------------

    def submit(self, record: AuditRecord) -> asyncio.Future[tuple[int, bytes]]:
        """Seal and queue a record; the future resolves to (seq, hash) once durable.

        A failure (store unavailable, closing) resolves the future with StoreUnavailable:
        the caller must then refuse the access it was about to grant.
        """
        when = self._now() if record.time is None else timestamp(record.time)
        return self._store.submit(seal(record, when, self._ring, self._server))

    async def record(self, record: AuditRecord) -> int:
        seq, _ = await self.submit(record)
        return seq

    def _committed(self, records: int, head: int) -> None:
        """After each group commit: count, and ask for a checkpoint every N records."""
        counts = self._counts
        if not head:
            counts.failed += records
            return
        counts.appended += records
        if head - self._signed_count >= self._every:
            self._due.set()

    # -- checkpoints --------------------------------------------------------------------

    async def _load_checkpoints(self) -> None:
        """Where signing left off: the newest valid checkpoint (each one carries the purge
        anchor forward, so it also says what retention has removed)."""
        found = await self.latest_checkpoint()
        if found is not None:
            checkpoint = found[0]
            self._signed_count = max(self._signed_count, checkpoint.count)
            if checkpoint.purged > self._purged:
                self._purged, self._purged_head = checkpoint.purged, checkpoint.purged_head

    async def latest_checkpoint(
            self, at_most: int | None = None) -> tuple[Checkpoint, CheckpointRow] | None:
        """The newest checkpoint (with count <= at_most) that is signed by a trusted key."""
        high = at_most
        while True:
            rows = await self._store.checkpoints(0, high, newest_first=True, limit=64)
            for row in rows:
                checkpoint, _ = open_checkpoint(row.body, row.signature, self._keys.trusted)
                if checkpoint is not None and checkpoint.log == self.log_id:
                    return checkpoint, row
            if len(rows) < 64:
                return None
            high = rows[-1].count - 1

    async def checkpoint(self) -> int | None:
        """Sign the head if it moved since the last checkpoint; returns the count signed.

        The head is this process's own: it linked those records itself, and checked the
        chain and MACs of any another process appended, so the hash it signs is the true
        one even if the file was altered meanwhile.
        """
        async with self._checkpoint_lock:
            count, head = await self._store.sync_head()
            if count <= self._signed_count:
                return None
            await self._sign(count, head)
            return count

    async def cover(self) -> int:
        """Make sure a checkpoint covers every committed record; returns the count signed."""
        await self.checkpoint()
        return self._signed_count

    async def seal_head(self) -> int:
        """Verify the records after the last checkpoint, then sign the head over them.

        For a head this process did not write itself: at start (a crash left the tail
        unsigned) and for a tool that must cover what it exports. A tail that does not
        verify is never signed: AuditIntegrityError.
        """
        async with self._checkpoint_lock:
            await self._load_checkpoints()
            count, head = await self._store.sync_head()
            if count > self._signed_count:
                start = max(self._signed_count, self._purged)
                await self._verify_range(start, count)
                await self._sign(count, head)
            return count

    async def _sign(self, count: int, head: bytes) -> None:
        checkpoint = Checkpoint(self.log_id, count, head, timestamp(self._clock()),
                                self._keys.signing.id, self._purged, self._purged_head)
        body, signature = checkpoint.sign(self._keys.signing)
        await self._store.add_checkpoint(count, checkpoint.time, body, signature)
        self._signed_count = count
        # The head hash in the log is a copy kept outside the database: an anchor for
        # anyone who ships logs elsewhere (`audit verify --expect-head-file` reads this
        # line as it is). Not PHI: a record number, a hash and the log's random id.
        log.info("audit checkpoint signed: record %d, head %s, log %s", count, head.hex(),
                 self.log_id)
        await self._publish(body, signature, count)

    async def _publish(self, body: bytes, signature: bytes, count: int) -> None:
        """Hand a signed checkpoint to every publisher: files before this returns (so the
        head is outside the data dir once signed), the network in the background."""
        line = published_line(body, signature)
        for publisher in self._publishers:
            if isinstance(publisher, FilePublisher):
                await self._publish_one(publisher, line, count)
            else:
                task = asyncio.create_task(self._publish_one(publisher, line, count),
                                           name="audit-publish")
                self._publishing.add(task)
                task.add_done_callback(self._publishing.discard)

    async def _publish_one(self, publisher: Publisher, line: bytes, count: int) -> None:
        try:
            await publisher.publish(line, self.log_id, count)
        except PublishError as exc:
            self._publish_failed.add(1)
            log.error("audit checkpoint of record %d not published: %s", count, exc)

    async def _check_published(self) -> None:
        """Refuse a store that does not reach a head this log published before: the
        database was rolled back (an older copy) or its tail cut off."""
        for publisher in self._publishers:
            if not isinstance(publisher, FilePublisher):
                continue
            published = await asyncio.to_thread(publisher.heads, self.log_id)
            heads = [h for h in published if h.log == self.log_id]
            if not heads:
                if published or (publisher.path.is_dir() and any(publisher.path.iterdir())):
                    log.warning("%s holds heads of other audit logs only: this audit trail "
                                "(log %s) is new, or audit.db was replaced", publisher.name,
                                self.log_id)
                continue
            newest = max(heads, key=lambda h: h.seq)
            count, _ = await self._store.sync_head()
            problem = await self._missing_head(newest, count)
            if problem is not None:
                raise AuditIntegrityError(
                    f"{problem}; refusing to extend it. Restore the audit database, or run "
                    f"`isthmus audit verify` to see what is missing")

    async def _missing_head(self, head: Head, count: int) -> str | None:
        if head.seq > count:
            return (f"the audit trail ends at record {count} but {head.source} holds its "
                    f"signed head at record {head.seq}: it was rolled back or truncated")
        if head.seq <= self._purged:
            return None  # purged by retention since; the purge anchor carries on
        stored = await self._store.hash_at(head.seq)
        if stored != head.hash:
            return (f"audit record {head.seq} does not match the head {head.source} holds: "
                    "the audit database was replaced or rewritten")
        return None

    async def _verify_range(self, after: int, through: int) -> bytes:
        """Check records after..through link up from a trusted hash; returns the last hash."""
        prev = await self._trusted_hash(after)
        seq = after
        async for row in self._store.scan(after + 1, through):
            if row.seq != seq + 1:
                raise AuditIntegrityError(f"audit record {seq + 1} is missing")
            computed = link(prev, row.seq, digest(row.body))
            if computed != row.hash:
                raise AuditIntegrityError(f"audit record {row.seq} does not match its hash")
            if row.mac_key == self._chain.mac_key_id:
                if self._chain.mac(computed) != row.mac:
                    raise AuditIntegrityError(f"audit record {row.seq}: MAC does not verify")
            elif row.mac_key not in self._keys.trusted:
                raise AuditIntegrityError(f"audit record {row.seq} is sealed with an "
                                          "unknown key")
            seq, prev = row.seq, computed
        if seq != through:
            raise AuditIntegrityError(f"audit record {seq + 1} is missing")
        return prev

    async def _trusted_hash(self, seq: int) -> bytes:
        """The hash of record `seq` from something signed: genesis, purge or checkpoint."""
        if seq == 0:
            return self._chain.genesis
        if seq == self._purged and self._purged_head is not None:
            return self._purged_head
        for row in await self._store.checkpoints(seq, seq):
            checkpoint, _ = open_checkpoint(row.body, row.signature, self._keys.trusted)
            if checkpoint is not None and checkpoint.log == self.log_id:
                return checkpoint.head
        raise AuditIntegrityError(f"no signed checkpoint at audit record {seq}")

    async def _checkpoint_loop(self) -> None:
        # Stopped by a flag, not by cancelling: a cancelled wait_for can swallow the
        # cancellation (Python 3.11) and a closing log would then wait forever.
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._due.wait()
            self._due.clear()
            if self._stopping:
                return
            try:
                await self.checkpoint()
            except Exception as exc:  # retried at the next interval
                log.error("audit checkpoint failed: %s", type(exc).__name__)

    # -- retention ----------------------------------------------------------------------

    async def purge(self, older_than: datetime) -> int:
        """Remove records recorded before `older_than`; the chain stays verifiable.

        The records up to the last purged one are verified first (from the checkpoint
        before them), so the anchor a new signed checkpoint carries is the true hash.
        """
        async with self._checkpoint_lock:
            first_kept = await self._store.first_seq_at_or_after(timestamp(older_than))
            count, head = self._store.head
            through = count if first_kept is None else first_kept - 1
            if through <= self._purged:
                return 0
            before = await self.latest_checkpoint(at_most=through)
            start = max(before[0].count if before else 0, self._purged)
            purged_head = await self._verify_range(start, through)
            checkpoint = Checkpoint(self.log_id, count, head, timestamp(self._clock()),
                                    self._keys.signing.id, through, purged_head)
            body, signature = checkpoint.sign(self._keys.signing)
            deleted = await self._store.purge(through, count, checkpoint.time, body,
                                              signature)
            self._purged, self._purged_head = through, purged_head
            self._signed_count = max(self._signed_count, count)
            log.info("audit retention: purged %d records through record %d; the chain "
                     "continues from head %s", deleted, through, purged_head.hex())
            await self._publish(body, signature, count)
            return deleted

    # -- reading ------------------------------------------------------------------------

    def filter_for(self, query: AuditQuery, max_seq: int | None = None) -> AuditFilter:
        """The store conditions for a reviewer's query (patient via the blind indexes)."""
        patient_indexes: tuple[bytes, ...] = ()
        patient_id_indexes: tuple[bytes, ...] = ()
        if query.patient is not None:
            keys = self._ring.keys
            patient_id_indexes = tuple(
                k.blind_index("id:" + identifier_part(query.patient)) for k in keys)
            if not is_bare(query.patient):
                patient_indexes = tuple(k.blind_index("ref:" + query.patient) for k in keys)
        client_prefix = None
        if query.client is not None and "|" not in query.client:
            client_prefix = query.client
        return AuditFilter(
            start=timestamp(query.start) if query.start else None,
            end=timestamp(query.end) if query.end else None,
            client_id=query.client, client_prefix=client_prefix,
            action=str(query.action) if query.action else None,
            patient_indexes=patient_indexes, patient_id_indexes=patient_id_indexes,
            max_seq=max_seq)

    async def search(self, query: AuditQuery, after: int = 0, limit: int = 100,
                     max_seq: int | None = None) -> list[StoredAuditRow]:
        return await self._store.search(self.filter_for(query, max_seq), after, limit)

    async def checkpoint_rows(self, low: int = 0, high: int | None = None, *,
                              newest_first: bool = False,
                              limit: int | None = None) -> list[CheckpointRow]:
        return await self._store.checkpoints(low, high, newest_first=newest_first,
                                             limit=limit)

    async def checkpoint_counts(self, low: int = 0, high: int | None = None) -> list[int]:
        return await self._store.checkpoint_counts(low, high)

    def scan(self, from_seq: int, to_seq: int) -> AsyncIterator[StoredAuditRow]:
        return self._store.scan(from_seq, to_seq)

    @property
    def purged(self) -> int:
        return self._purged

    async def probe_writable(self) -> None:
        await self._store.probe_writable()

    async def close(self) -> None:
        """Commit what is queued, sign the head (gateway), close the store."""
        if self._timer is not None:
            self._stopping = True
            self._due.set()
            await self._timer
        try:
            await self._store.stop_writer()
            if self._signs:
                await self.checkpoint()
        except (StoreUnavailable, OSError, sqlite3.Error) as exc:
            log.error("audit log: the closing checkpoint failed: %s", type(exc).__name__)
        finally:
            await self._store.close()
            if self._publishing:
                await asyncio.wait(self._publishing)  # each bounded by its own timeout
            for publisher in self._publishers:
                await publisher.close()


async def _check_sealing_key(store: AuditStore, keys: AuditKeys) -> None:
    """Refuse to extend a log sealed with a key we do not hold or trust."""
    last = await store.last_row()
    if last is not None and last.mac_key not in keys.trusted:
        raise AuditKeyError(
            f"the audit log is sealed with signing key {last.mac_key}, which is not "
            "configured here (audit.signing_key_file / audit.trusted_public_key_files)")


async def verify_store(path: Path, trusted: Mapping[str, Ed25519PublicKey],
                       signing: SigningKey | None = None,
                       heads: Sequence[Head] | None = None) -> Report:
    """Verify a live audit database read-only: chain, checkpoints, search columns, with
    the signing key (which the MAC key derives from) every record's MAC, and with `heads`
    (kept outside the store) that it was not rolled back, truncated or replaced."""
    db, reader = await open_reader(path)
    try:
        return await verify_reader(reader, trusted, signing, heads)
    finally:
        await db.close()


class _Reader(Protocol):
    async def log_id(self) -> str | None: ...

    async def checkpoints(self) -> list[CheckpointRow]: ...

    def scan(self, from_seq: int = 1) -> AsyncIterator[StoredAuditRow]: ...


async def verify_reader(reader: _Reader, trusted: Mapping[str, Ed25519PublicKey],
                        signing: SigningKey | None = None,
                        heads: Sequence[Head] | None = None) -> Report:
    """`verify_store` over an open reader (the SQLite file's or PostgreSQL's tables)."""
    log_id = await reader.log_id()
    checkpoints = [(c.body, c.signature) for c in await reader.checkpoints()]
    chain = Chain(log_id, signing) if signing is not None and log_id else None
    verifier = ChainVerifier(log_id, checkpoints, trusted, chain=chain)
    if heads is not None:
        verifier.expect(heads)
    async for row in reader.scan(1):
        verifier.record(row.seq, digest(row.body), row.hash, row.mac, row.mac_key)
        try:
            body = parse_body(row.body)
        except ValueError:
            verifier.problem(row.seq, "its body is not a sealed record")
            continue
        if not columns_match(body, row.recorded_at, row.action, row.client_id,
                             row.outcome, row.patient_index, row.patient_id_index):
            verifier.problem(row.seq, "its search columns do not match its sealed body")
    return verifier.finish()
