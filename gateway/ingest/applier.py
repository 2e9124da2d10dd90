"""The local-store applier: translated HL7 messages applied to the embedded FHIR store.

The inbox row is committed (and acknowledged) first; applying its Bundle comes after, in
inbox order, so messages about one patient land in the order they arrived. Every write is
conditional (update on the business identifier, create-if-absent, PUT at a deterministic
id), and an update that changes nothing adds no version, so applying a message twice
(a crash after the store committed but before the inbox row said so) changes nothing.
Rows still marked `translated` are picked up at start-up and by a periodic sweep.
Where several instances apply one inbox (PostgreSQL), each row is applied in its
patient's turn (`ApplyTurns`), after the patient's earlier rows, whoever committed them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from gateway.canonical import Translation
from gateway.fhir.bundle import provenance_id
from gateway.fhir.outcome import FhirError
from gateway.fhir.search import SearchError, SearchRegistry
from gateway.hl7.errors import ErrorCode, Hl7Error
from gateway.ingest.merges import merge_writes
from gateway.ingest.replay import replay
from gateway.ingest.writes import bundle_writes as bundle_writes  # bench/ imports it here
from gateway.ingest.writes import translation_writes
from gateway.mapping.engine import Translator
from gateway.store.errors import AmbiguousMatch, StoreUnavailable
from gateway.store.fhir import FhirStore, Merge, SearchQuery, WriteConflict
from gateway.store.inbox import (
    APPLIED,
    FAILED,
    IDENTITY_CONFLICT,
    TRANSLATED,
    ApplyTurns,
    Inbox,
)

if TYPE_CHECKING:
    # Only the edge's applier counts (its telemetry is set up); an apply worker passes
    # none, and need not import the OpenTelemetry SDK for it.
    from gateway.telemetry.instruments import IngestMetrics

log = logging.getLogger(__name__)

# Told the result of applying one message: None, or the problem (for the application ACK).
Outcome = Callable[[Hl7Error | None], None]

class IdentityConflict(Exception):
    """Two records of the store hold the business identifier a message's write names: the
    store cannot tell which one the message is about."""

    def __init__(self, resource_type: str, condition: SearchQuery | None) -> None:
        super().__init__(f"two {resource_type} records share the identifier")
        self.resource_type = resource_type
        self.condition = condition


class LocalApplier:
    """Applies translated inbox rows to the FHIR store, in inbox order, exactly once."""

    def __init__(self, store: FhirStore, registry: SearchRegistry, inbox: Inbox,
                 translator: Translator, *, sweep_interval: float = 30.0,
                 max_batch: int = 256, max_held: int = 5_000,
                 metrics: IngestMetrics | None = None,
                 turns: ApplyTurns | None = None) -> None:
        self._store = store
        # Several instances apply the inbox: each row in its patient's turn (_in_turn).
        self._turns = turns
        self._metrics = metrics
        # The conflicts reported so far (by the write's search, kept only in memory): each
        # is logged and counted once, however many messages name it.
        self._conflicts: set[tuple[str, SearchQuery | None]] = set()
        self._registry = registry
        self._inbox = inbox
        self._translator = translator
        self._sweep_interval = sweep_interval
        self._sweep_wanted = False
        self._max_batch = max_batch
        # Past `max_held` queued messages only the inbox id is kept (the translation is
        # made again from the inbox when its turn comes): a backlog costs little memory and
        # keeps its order.
        self._max_held = max_held
        self._queue: list[tuple[int, Translation | None, Outcome | None]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # True while a batch (or the start-up sweep) is being applied: the queue is
        # already empty then, yet drain() must still wait.
        self._busy = False
        self.applied = 0
        self.failed = 0
        self.conflicted = 0

    def start(self) -> None:
        self._busy = True  # the start-up sweep comes first
        self._task = asyncio.create_task(self._run(), name="local-applier")

    def submit(self, inbox_id: int, translation: Translation | None,
               outcome: Outcome | None = None) -> None:
        """Queue a committed, translated message (the ACK has gone or is going out);
        `outcome` is told the result (None: applied) for the application ACK."""
        if not self._closing:
            held = translation if len(self._queue) < self._max_held else None
            self._queue.append((inbox_id, held, outcome))
            self._wakeup.set()

    def sweep_soon(self, translator: Translator | None = None) -> None:
        """Look for rows marked `translated` now rather than at the next periodic sweep
        (a replay from the console has just marked some). `translator`: the tables that
        replay used, read from disk after a fix; the sweep re-translates with them (with
        the tables loaded at start it would undo the fix)."""
        if translator is not None:
            self._translator = translator
        self._sweep_wanted = True
        self._wakeup.set()

    async def drain(self) -> None:
        """Wait until everything queued so far is applied (tests, shutdown)."""
        while self._queue or self._wakeup.is_set() or self._busy:
            if self._task is not None and self._task.done():
                raise RuntimeError("the local store applier has stopped")
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)

    async def close(self) -> None:
        """Finish the batch in hand, then stop; what is left is swept at the next start."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except TimeoutError:
                log.warning("local store applier stopped with %d messages queued; they are "
                            "applied at the next start", len(self._queue))

    async def _run(self) -> None:
        await self._sweep()  # rows a crash left between commit and apply
        self._busy = False
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), self._sweep_interval)
            except TimeoutError:
                if not self._queue:
                    await self._sweep()
                continue
            self._wakeup.clear()
            self._busy = True
            try:
                if self._sweep_wanted:
                    self._sweep_wanted = False
                    await self._sweep()
                while self._queue:
                    batch = self._queue[:self._max_batch]
                    del self._queue[:len(batch)]
                    try:
                        await self._apply(await self._held(batch))
                    except Exception as exc:  # a bug or an unreadable inbox costs this
                        # batch a wait for the sweep (its rows stay translated), never
                        # the applier: a dead loop would apply nothing until a restart.
                        log.error("local store applier: a batch of %d failed (%s); its "
                                  "rows wait for the sweep", len(batch), type(exc).__name__)
                    if self._closing:
                        # Stop after the batch in hand: the rest is committed and marked
                        # translated, for the next start's sweep (a long backlog must not
                        # hold a SIGTERM up).
                        break
            finally:
                self._busy = False
            if self._closing:
                return

    async def _sweep(self) -> None:
        """Re-translate and apply rows still marked `translated` (oldest first)."""
        after = 0
        try:
            while not self._closing:
                rows = await self._inbox.with_status(TRANSLATED, self._max_batch, after)
                if not rows:
                    return
                after = rows[-1][0]
                batch: list[tuple[int, Translation, Outcome | None]] = []
                outcomes: list[tuple[int, str, str]] = []
                for row_id, raw, received_at in rows:
                    replayed = replay(self._translator, raw, received_at)
                    translation = replayed.translation
                    if translation is None:
                        outcomes.append((row_id, replayed.status, replayed.error_text))
                    elif await self._committed_before(translation):
                        outcomes.append((row_id, APPLIED, ""))
                    else:
                        batch.append((row_id, translation, None))
                await self._inbox.set_statuses(outcomes)
                await self._apply(batch)
        except StoreUnavailable:
            log.error("local store applier: the inbox is unavailable; retrying later")
        except Exception as exc:  # a sweep bug must not stop live applies
            log.error("local store sweep failed: %s", type(exc).__name__)

    async def _committed_before(self, translation: Translation) -> bool:
        """Whether the store already holds this message (the crash came after its commit):
        its Provenance, PUT at an id derived from sender and control id in the same
        transaction, is there. Applying it again would put its older content over what
        later messages wrote, and add versions."""
        made_by = provenance_id(translation.provenance)
        return await self._store.read("Provenance", made_by) is not None

    async def _held(self, batch: Sequence[tuple[int, Translation | None, Outcome | None]]
                    ) -> list[tuple[int, Translation, Outcome | None]]:
        """The batch with every translation at hand: those not kept in memory are made
        again from the inbox (as received); one that no longer translates is marked."""
        ready: list[tuple[int, Translation, Outcome | None]] = []
        refused: list[tuple[int, str, str]] = []
        for inbox_id, translation, outcome in batch:
            if translation is None:
                row = await self._inbox.get(inbox_id)
                if row is None:
                    continue
                entry, raw, _ = row
                received = datetime.fromisoformat(entry.received_at.replace("Z", "+00:00"))
                replayed = replay(self._translator, raw, received)
                if replayed.translation is None:
                    refused.append((inbox_id, replayed.status, replayed.error_text))
                    continue
                translation = replayed.translation
            ready.append((inbox_id, translation, outcome))
        await self._inbox.set_statuses(refused)
        return ready

    async def _apply(self, batch: Sequence[tuple[int, Translation, Outcome | None]]) -> None:
        """Apply each message as its own transaction; record the outcomes in the inbox."""
        if not batch:
            return
        if self._turns is not None:
            for inbox_id, translation, outcome in batch:
                await self._in_turn(self._turns, inbox_id, translation, outcome)
            return
        results: list[BaseException | None]
        if self._store.applies_in_call_order:
            # Submitted together so the store can group-commit them; it applies them in
            # submission order, which keeps each patient's messages in arrival order.
            results = await asyncio.gather(*(self._apply_one(t) for _, t, _ in batch),
                                           return_exceptions=True)
        else:
            # Each its own transaction (PostgreSQL), one after another: run at once, a
            # message could land before an earlier one about the same patient (an A40
            # before the survivor's admit, whose older content a resend of the A40 then
            # writes over again), or two deadlock on the records' locks, one left for
            # the sweep to apply later still. (Messages naming one ward, practitioner or insurer
            # already waited for each other there: the writer locks each such record.)
            results = [await _failure(self._apply_one(t)) for _, t, _ in batch]
        outcomes = [mark for (inbox_id, _, outcome), result in zip(batch, results, strict=True)
                    if (mark := self._settle(inbox_id, result, outcome)) is not None]
        await self._mark(outcomes)

    async def _in_turn(self, turns: ApplyTurns, inbox_id: int, translation: Translation,
                       outcome: Outcome | None) -> None:
        """Apply one row in its patient's turn: first the patient's earlier rows still to
        apply, whichever instance committed them (this instance's own are among them
        only if a failure left them), so that one patient's rows reach the store in inbox
        order; each row marked before the turn ends, so the next holder finds it done."""
        try:
            async with turns.turn(inbox_id) as pending:
                if inbox_id not in pending:
                    # Applied (or refused) in an earlier turn: another instance reached it
                    # first, as a later row's predecessor or in its sweep.
                    await self._tell(inbox_id, outcome)
                    return
                rows = await self._found([i for i in pending if i != inbox_id])
                for row_id, row, told in [*rows, (inbox_id, translation, outcome)]:
                    mark = self._settle(row_id, await _failure(self._apply_one(row)), told)
                    # Not applied, or applied and not marked: the patient's later rows
                    # wait (the sweep, or their own turn, comes back to them in order).
                    if mark is None or not await self._mark([mark]):
                        return
        except StoreUnavailable:
            log.error("local store applier: the inbox is unavailable; inbox %d stays "
                      "translated", inbox_id)
        except Exception as exc:  # the inbox's reads: the row waits for the sweep, and
            # the applier goes on with the next
            log.error("local store applier: inbox %d stays translated: %s", inbox_id,
                      type(exc).__name__)

    async def _found(self, ids: Sequence[int]
                     ) -> list[tuple[int, Translation, Outcome | None]]:
        """Rows found in the inbox rather than handed on, made again as received; those a
        crash applied without marking (their Provenance is in the store) are marked."""
        rows: list[tuple[int, Translation, Outcome | None]] = []
        done: list[tuple[int, str, str]] = []
        for row in await self._held([(row_id, None, None) for row_id in ids]):
            if await self._committed_before(row[1]):
                done.append((row[0], APPLIED, ""))
            else:
                rows.append(row)
        await self._inbox.set_statuses(done)
        return rows

    async def _tell(self, inbox_id: int, outcome: Outcome | None) -> None:
        """Tell `outcome` what became of a row another instance applied."""
        if outcome is None:
            return
        row = await self._inbox.get(inbox_id)
        if row is not None and row[0].status == APPLIED:
            outcome(None)
        else:
            reason = row[0].error if row is not None and row[0].error else (
                "not applied to the FHIR store")
            outcome(Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR, reason))

    def _settle(self, inbox_id: int, result: BaseException | None,
                outcome: Outcome | None) -> tuple[int, str, str] | None:
        """Count and tell one message's result; its (id, status, error) to mark, or None
        when the store was unavailable (not applied and not marked: the next sweep tries
        again)."""
        if isinstance(result, StoreUnavailable):
            log.error("local store unavailable; inbox %d stays translated", inbox_id)
            return None
        if isinstance(result, IdentityConflict):
            self.conflicted += 1
            self._report(result, inbox_id)
            reason = (f"two {result.resource_type} records in the FHIR store share the "
                      "identifier this message names: merge them (isthmus fhir merge), "
                      "then isthmus inbox replay --failed")
            if outcome is not None:
                outcome(Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR, reason))
            return inbox_id, IDENTITY_CONFLICT, reason
        if isinstance(result, BaseException):
            self.failed += 1
            reason = _reason(result)
            log.warning("inbox %d could not be applied to the FHIR store: %s",
                        inbox_id, reason)
            if outcome is not None:
                outcome(Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR, reason))
            return inbox_id, FAILED, reason
        self.applied += 1
        if outcome is not None:
            outcome(None)
        return inbox_id, APPLIED, ""

    async def _mark(self, outcomes: Sequence[tuple[int, str, str]]) -> bool:
        """Record outcomes in the inbox; False if they could not be."""
        try:
            await self._inbox.set_statuses(outcomes)
        except Exception as exc:  # applied but unmarked: the sweep finds their Provenance
            log.error("could not mark %d inbox rows applied: %s", len(outcomes),
                      type(exc).__name__)
            return False
        return True

    def _report(self, conflict: IdentityConflict, inbox_id: int) -> None:
        """Log and count a conflict the first time a message runs into it."""
        key = (conflict.resource_type, conflict.condition)
        if key in self._conflicts:
            return
        self._conflicts.add(key)
        if self._metrics is not None:
            self._metrics.identity_conflict(conflict.resource_type)
        log.warning("two %s records in the FHIR store share the business identifier inbox "
                    "%d names; it and every later message naming it wait as "
                    "identity-conflict: merge the records (isthmus fhir merge), then "
                    "isthmus inbox replay --failed (docs/operations.md)",
                    conflict.resource_type, inbox_id)

    async def _apply_one(self, translation: Translation) -> None:
        writes = translation_writes(self._registry, translation)
        merges: list[Merge] = []
        rule = self._translator.merge_rule(translation.provenance.message_type)
        if rule is not None:
            writes, merges = merge_writes(self._registry, writes, rule)
        try:
            await self._store.transact(writes, atomic=True, merges=merges)
        except AmbiguousMatch as exc:
            write = writes[exc.entry] if exc.entry is not None and 0 <= exc.entry < len(
                writes) else None
            raise IdentityConflict(write.resource_type if write else "resource",
                                   write.condition if write else None) from None


async def _failure(work: Awaitable[None]) -> Exception | None:
    """What `work` raised (None: done), as `gather(return_exceptions=True)` gives it."""
    try:
        await work
    except Exception as exc:
        return exc
    return None


def _reason(exc: BaseException) -> str:
    """A reason safe to store and show: the rule broken, never a value."""
    if isinstance(exc, WriteConflict):
        return f"store refused: {exc.reason}"
    if isinstance(exc, FhirError):
        return f"store refused: {exc.reason}"
    if isinstance(exc, SearchError):
        return "store refused: a conditional reference could not be read"
    return f"internal error applying to the store ({type(exc).__name__})"
