"""The inbox follower: an apply worker's loop, in a process of its own beside the edge.

The edge commits each message with its ACK and answers; it no longer applies. A worker
follows the inbox instead: it reads the rows marked `translated` in inbox order, takes each
one's translation made for its ACK (kept, `keep`) or translates it again from the stored
bytes (the same `replay` the sweep uses, so the same resources and ids), applies them to
the FHIR store in group commits and marks them. With several workers each takes the
patients whose key falls in its share, so one patient's messages are applied by one
worker, in inbox order. A merge (ADT^A40) names two patients, perhaps of two shares: it
waits until every older row, whoever's, has been applied (A41 and A47 alike).

A crash of the edge or of a worker loses nothing: the row is committed before the ACK and
stays `translated` until its apply is committed; rows a crash left are found again when a
worker starts (checked against the store for those whose apply committed but whose mark
did not: their Provenance is there).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from gateway.canonical import Translation, wire
from gateway.fhir.search import SearchRegistry
from gateway.hl7.errors import ErrorCode, Hl7Error
from gateway.hl7.message import parse_message
from gateway.ingest.applier import LocalApplier, Outcome
from gateway.ingest.prepare import message_key
from gateway.ingest.replay import Replay, patient_key, translate
from gateway.ingest.writes import translation_writes
from gateway.mapping.engine import Translator
from gateway.store.errors import StoreUnavailable
from gateway.store.fhir import FhirStore
from gateway.store.inbox import APPLIED, FAILED, TRANSLATED, Inbox

log = logging.getLogger(__name__)

# A row this large is translated, and a translation this large made into writes, on a
# thread, so that one heavy message does not stop the worker answering the edge.
_LARGE_BYTES = 64 * 1024
_LARGE_RESOURCES = 500
# At most this many translations kept for their rows, in at most `kept_bytes_max` bytes,
# none for longer than this: enough for the apply to lag a long burst without translating
# the rows again. A burst of 12,000 ADT^A01 ACKed at ~1,450/s and applied at ~450/s leaves
# ~8,300 waiting when it ends and the last one applied ~18 s after it came. In the wire
# form (`canonical/wire.py`: 1.3 KB for `bench/apply_lag.py`'s ADT^A01, 2.2 KB for
# `bench/translate.py`'s, 4.1 and 7.1 KB pickled as models) all 12,000 fit in 32 MiB;
# pickled in 16 MiB, ~4,000 did, and 1,500-1,850 of that bench's 8,000 rows were
# translated again (0 now).
KEPT_MAX = 20_000
_KEPT_SECONDS = 60.0
# What a kept translation holds besides its bytes: its key (a 16-byte digest), the bytes
# object's header, the (bytes, time) pair and the ordered dict's entry (~240, measured).
KEPT_ENTRY_BYTES = 256

# How long a merge waits for older rows in other workers' shares to be applied, polling.
_MERGE_WAIT = 10.0
_MERGE_POLL = 0.01

# Told what became of rows: (inbox id, '' when applied, else why not), once per batch.
Report = Callable[[Sequence[tuple[int, str]]], None]


class Applier(Protocol):
    """What the edge hands committed translations to: applied here or in workers."""

    def submit(self, inbox_id: int, translation: Translation | None,
               outcome: Outcome | None = None) -> None: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


def kept_bytes_max(memory_budget_bytes: int, workers: int) -> int:
    """The bytes of translations one apply worker keeps (`InboxFollower.keep`), and the
    edge holds for one that is starting: an eighth of `processes.memory_budget_bytes`
    shared by all the workers (each keeps its share's), so together they hold no more
    however many there are. At the default 256 MiB, 32 MiB: ~13,000 ADT^A01 in the wire
    form with what each entry costs besides (see `KEPT_MAX`); the edge's frames have the
    budget itself, a worker's reads a quarter of it."""
    return memory_budget_bytes // 8 // max(1, workers)


def share_of(key: str, count: int) -> int:
    """The worker (0 .. count-1) that applies messages about the patient with this key
    (`patient_key`); messages without a patient go to worker 0."""
    if count <= 1 or not key:
        return 0
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % count


class InboxFollower(LocalApplier):
    """Applies the rows marked `translated` that fall in this worker's share, in inbox
    order, as they are committed; `wake()` says new rows were committed."""

    def __init__(self, store: FhirStore, registry: SearchRegistry, inbox: Inbox,
                 translator: Translator, report: Report, *, share: int = 0,
                 shares: int = 1, max_batch: int = 64, budget_bytes: int = 64 << 20,
                 kept_bytes: int = 32 << 20, sweep_interval: float = 30.0) -> None:
        super().__init__(store, registry, inbox, translator, sweep_interval=sweep_interval,
                         max_batch=max_batch)
        self._tell_edge = report
        self._share = share
        self._shares = shares
        self._budget = budget_bytes
        self._wake = asyncio.Event()
        self._stopping = False
        self._average = 4096  # bytes per row read lately: sizes the next read
        # Translations made for the edge's ACKs (by a translator process, handed on by the
        # edge), by the bytes translated, so a row is not translated twice. Bounded by
        # count and by the bytes of the messages they came from: when full, new ones are
        # not kept (the rows are applied oldest first, so evicting the oldest would only
        # miss them all); one never looked up (its message was refused after translating)
        # is dropped after a minute.
        # Kept in the wire form (`canonical/wire.py`, 2.2 KB an ADT^A01 of 16 resources):
        # a twentieth of the objects' memory (45 KB), made into them only when applied.
        self._kept: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._kept_bytes = 0
        self._kept_max_bytes = kept_bytes  # `kept_bytes_max` in `worker_main`
        self.depth = 0  # rows read and not yet applied (for /metrics)
        self.batch_seconds = 0.0  # the last batch, read to marked
        # Rows translated here since the last report: none was kept for them (made before
        # a restart, by the edge while no translator was ready, or not kept: full).
        self.translated_again = 0

    def keep(self, key: bytes, translation: bytes) -> None:
        """Hold a translation made for the ACK (its wire form) until its row comes up:
        `key` is the message's `message_key`."""
        now = asyncio.get_running_loop().time()
        while self._kept and next(iter(self._kept.values()))[1] < now - _KEPT_SECONDS:
            _, (held, _) = self._kept.popitem(last=False)
            self._kept_bytes -= len(held) + KEPT_ENTRY_BYTES
        size = len(translation) + KEPT_ENTRY_BYTES
        if (key in self._kept or len(self._kept) >= KEPT_MAX
                or self._kept_bytes + size > self._kept_max_bytes):
            return
        self._kept[key] = (translation, now)
        self._kept_bytes += size

    def _kept_for(self, raw: bytes) -> Replay | None:
        """The translation kept for this row, taken out (None: none, or one that does not
        read: the row is translated again)."""
        kept = self._kept.pop(message_key(raw), None)
        if kept is None:
            return None
        self._kept_bytes -= len(kept[0]) + KEPT_ENTRY_BYTES
        try:
            # Written by our own translator process, handed on by the edge.
            return Replay(TRANSLATED, wire.decode(kept[0]))
        except wire.WireFormError as exc:
            log.warning("apply worker: a kept translation did not read (%s); the row is "
                        "translated again", exc)
            return None

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Finish the batch in hand, then return from `follow` (the rest waits, marked
        `translated`, for the next start)."""
        self._stopping = True
        self._wake.set()

    async def follow(self) -> None:
        """Until `stop()`: every row left `translated`, then each new one as it commits."""
        cursor = 0
        # Rows up to here may have been applied by a worker that died before marking them.
        checked_upto: int | None = None
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()  # before reading: a commit after the read wakes us again
            limit = max(1, min(self._max_batch, self._budget // max(self._average, 1)))
            try:
                rows = await self._inbox.with_status(TRANSLATED, limit, cursor)
            except StoreUnavailable:
                rows = []
            if checked_upto is None:
                checked_upto = rows[-1][0] if rows else 0
                checked_upto = max(checked_upto, await self._newest_translated(cursor))
            if not rows:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._sweep_interval)
                except TimeoutError:
                    # Idle: go over the rows a store failure left behind once more, checking
                    # the store first for any applied but not marked.
                    checked_upto, cursor = cursor, 0
                continue
            rows = _within(rows, self._budget)
            self._average = max(1, sum(len(raw) for _, raw, _ in rows) // len(rows))
            started = loop.time()
            self.depth = len(rows)
            cursor = rows[-1][0]
            try:
                await self._apply_rows(rows, checked_upto)
            except Exception as exc:  # a bug costs this batch a retry, never the worker
                log.error("apply worker: a batch failed: %s", type(exc).__name__)
            self.depth = 0
            self.batch_seconds = loop.time() - started

    async def _newest_translated(self, after: int) -> int:
        """The highest id marked `translated` now (0: none): the rows a crash may have
        applied without marking them end there."""
        newest = after
        while True:
            rows = await self._inbox.with_status(TRANSLATED, 500, newest)
            if not rows:
                return newest
            newest = rows[-1][0]

    async def _apply_rows(self, rows: Sequence[tuple[int, bytes, datetime]],
                          checked_upto: int) -> None:
        batch: list[tuple[int, Translation, Outcome | None]] = []
        marks: list[tuple[int, str, str]] = []
        reports: list[tuple[int, str]] = []
        for row_id, raw, received_at in rows:
            kept = self._kept_for(raw)
            replayed: Replay | None
            if kept is not None:
                replayed = kept
            elif len(raw) >= _LARGE_BYTES:
                # On a thread: what the edge sends (kept translations) keeps being read.
                replayed = await asyncio.to_thread(self._mine, raw, received_at)
            else:
                replayed = self._mine(raw, received_at)
                await asyncio.sleep(0)  # what the edge sent (kept translations) goes first
            if replayed is None:
                continue  # another worker's patient
            if kept is None:
                self.translated_again += 1
            translation = replayed.translation
            if translation is None:
                marks.append((row_id, replayed.status, replayed.error_text))
                reports.append((row_id, replayed.error_text or replayed.reason
                                or replayed.status))
            elif row_id <= checked_upto and await self._committed_before(translation):
                marks.append((row_id, APPLIED, ""))
                reports.append((row_id, ""))
            else:
                if self._shares > 1 and self._translator.merge_rule(
                        translation.provenance.message_type) is not None:
                    # What came before first, then wait for the other workers' rows.
                    await self._inbox.set_statuses(marks)
                    await self._apply(batch)
                    marks, batch = [], []
                    await self._older_rows_settled(row_id)
                batch.append((row_id, translation, _reporter(reports, row_id)))
        await self._inbox.set_statuses(marks)
        await self._apply(batch)
        if reports:
            self._tell_edge(reports)

    async def _older_rows_settled(self, row_id: int) -> None:
        """Wait until no row older than `row_id` is still to be applied, by any worker
        (`_MERGE_WAIT` at most). A merge names two patients, and the record it merges away
        may be in another worker's share: applied before that worker reached the admit
        that makes the record, the merge would find nothing and the admit then make a
        record no merge ever retires."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _MERGE_WAIT
        while not self._stopping:
            try:
                oldest = await self._inbox.with_status(TRANSLATED, 1)
            except StoreUnavailable:
                oldest = []
            if not oldest or oldest[0][0] >= row_id:
                return
            if loop.time() > deadline:
                # A row the store refused waits for the sweep; the merge does not.
                log.warning("apply worker: inbox %d (a merge) applied while older inbox "
                            "%d is still to be applied", row_id, oldest[0][0])
                return
            await asyncio.sleep(_MERGE_POLL)

    async def _apply_one(self, translation: Translation) -> None:
        if len(translation.resources) < _LARGE_RESOURCES:
            await super()._apply_one(translation)
            return
        # A heavy message's writes are made on a thread, for the reason above.
        writes = await asyncio.to_thread(translation_writes, self._registry, translation)
        await self._store.transact(writes, atomic=True)

    def _mine(self, raw: bytes, received_at: datetime) -> Replay | None:
        """The row translated again as received, or None when another worker's share
        holds its patient."""
        try:
            message = parse_message(raw)
        except Hl7Error as exc:
            return Replay(FAILED, error=exc, reason=exc.reason) if self._share == 0 else None
        if self._shares > 1 and share_of(patient_key(message), self._shares) != self._share:
            return None
        try:
            return translate(self._translator, message, received_at)
        except Exception as exc:  # a table or engine bug costs this message, not the worker
            log.error("apply worker: internal error translating a stored message: %s",
                      type(exc).__name__)
            reason = "internal error while translating"
            return Replay(FAILED, error=Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR, reason),
                          reason=reason)


def _within(rows: Sequence[tuple[int, bytes, datetime]], budget: int
            ) -> list[tuple[int, bytes, datetime]]:
    """The leading rows whose bytes fit the budget (always at least one)."""
    kept: list[tuple[int, bytes, datetime]] = []
    held = 0
    for row in rows:
        held += len(row[1])
        if kept and held > budget:
            break
        kept.append(row)
    return kept


def _reporter(reports: list[tuple[int, str]], row_id: int) -> Outcome:
    def outcome(problem: Hl7Error | None) -> None:
        reports.append((row_id, problem.reason if problem is not None else ""))
    return outcome
