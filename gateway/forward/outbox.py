"""The outbox dispatcher: delivers pending outbox rows to their backends, at their pace.

One worker per backend reads pending rows in id order (a window at a time, payloads
joined from the inbox) and keeps them in memory, grouped by patient: only the first
pending row of a patient may be in flight or waiting for its retry time, so each
patient's messages arrive in the order they were accepted; rows naming no patient
(patient key '') go in any order. Results are written back in batches (all the rows
delivered since the last write in one statement), and a patient's next row is sent only
once its previous row's result is on disk, so a crash can repeat a delivery (same control
id, for the backend to recognise) but never reorder one.

A `Retry` is tried again after a fully jittered exponential backoff (never sooner than
the backend's Retry-After) until `max_attempts`; then, or on a `Permanent` verdict, the
row goes dead for an operator (`isthmus outbox`), and its patient's later rows wait behind
it (in the store too: they are not read) until the operator retries or drops it. At the
start, after a failure that is the backend's (`Retry.fault`) and while its breaker is
open, the worker sends one row at a time until one succeeds, and the row it sends is one
that has not been failing: a struggling backend is probed, not hammered, and a poison
message that fails on every attempt is never the probe while another row is waiting.
A failure that is the message's own (the backend answered, refusing a row that has
failed before) slows only that row.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Observation

from gateway.forward.backend import Backend, Delivered, Delivery, Permanent, Retry, Verdict
from gateway.forward.resilience import retry_delay
from gateway.store.outbox import OutboxRow, OutboxStore
from gateway.telemetry import AttributeValue, Telemetry, safe_attributes

log = logging.getLogger(__name__)

# Rows read per query, and at most this many kept in memory per backend (with payloads).
_WINDOW = 512
_BUFFER = 4096
# How long the store may be unwritable before results are written again.
_STORE_RETRY = 1.0


@dataclass(frozen=True)
class DeliveryPolicy:
    """How hard and how long the outbox tries one backend, and how much may wait for it."""

    max_attempts: int = 12
    retry_base: float = 1.0
    retry_max_delay: float = 300.0
    outbox_cap: int = 100_000
    concurrency: int = 8


def control_id_for(outbox_id: int) -> str:
    """The MSH-10 an outbox row is delivered with: stable across attempts and restarts,
    20 characters (MSH-10 is ST, at most 20)."""
    return f"ISM{outbox_id:017d}"


@dataclass(frozen=True, slots=True)
class _Finished:
    row: OutboxRow
    verdict: Verdict


class _Instruments:
    def __init__(self, telemetry: Telemetry) -> None:
        meter = telemetry.meter
        self.deliveries: Counter = meter.create_counter(
            "isthmus.outbox.deliveries", unit="{attempt}",
            description="Delivery attempts by backend and verdict")
        self.delivery_ms: Histogram = meter.create_histogram(
            "isthmus.outbox.delivery_ms", unit="ms",
            description="Time of one delivery attempt, as the outbox sees it")


class _Worker:
    """Delivers one backend's pending rows; the only writer of their outcomes."""

    def __init__(self, outbox: OutboxStore, backend: Backend, policy: DeliveryPolicy,
                 poll_interval: float, instruments: _Instruments) -> None:
        self.name = backend.name
        self.backend = backend
        self.policy = policy
        self._outbox = outbox
        self._poll_interval = poll_interval
        self._instruments = instruments
        self._backend_attrs = safe_attributes({"forward.backend": backend.name})
        self._verdict_attrs = {
            verdict: safe_attributes({"forward.backend": backend.name,
                                      "forward.verdict": verdict})
            for verdict in ("delivered", "retry", "permanent")}
        # Pending rows in the store (for the cap and the depth gauge), and the oldest's
        # creation time (unix), both re-read at every poll.
        self.count = 0
        # Rows queued ever: a poll whose count read overlapped a commit keeps the running
        # count (the read may or may not hold the new rows: counting both would make
        # `full()` answer AR early).
        self._queued_total = 0
        self.oldest: float | None = None
        # The rows in memory: the highest id read, whether the store may hold more after
        # it, and the rows themselves, per patient key in id order. A patient's first row
        # is in `_ready` (may go now, never tried or only refused unsent), `_failing` (may
        # go now, has failed before), `_sleeping` (waits for next_at) or in flight.
        self._cursor = 0
        self._more = True
        self._resync = False
        self._buffered = 0
        self._queues: dict[str, deque[OutboxRow]] = {}
        self._ready: list[tuple[int, OutboxRow]] = []
        self._failing: list[tuple[int, OutboxRow]] = []
        self._sleeping: list[tuple[float, int, OutboxRow]] = []
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._finished: list[_Finished] = []
        # Results are written by one task at a time, beside the loop: deliveries of other
        # patients go on while a write waits for the disk.
        self._flushing: asyncio.Task[None] | None = None
        # One delivery at a time until one succeeds: at the start (a backend that is down
        # sees one attempt, not a burst of `concurrency`), after every failure that is the
        # backend's and while its breaker is open.
        self._probing = True
        self._last_poll = float("-inf")
        # Whether this process delivers the backend's rows (several instances on one
        # PostgreSQL database: one of them at a time; see OutboxStore.lead).
        self._leading = False
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    # -- control ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox-{self.name}")

    def queued(self) -> None:
        self.count += 1
        self._queued_total += 1
        self._more = True
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def wake_and_read(self) -> None:
        """Rows may have come in behind our back (another instance took them): read."""
        self._more = True
        self._wake.set()

    def idle(self) -> bool:
        """Nothing in flight, nothing to write, nothing due in memory or in the store."""
        due_soon = bool(self._sleeping) and self._sleeping[0][0] <= time.time()
        return (not self._in_flight and not self._finished and self._flushing is None
                and not self._ready and not self._failing and not due_soon and not self._more
                and not self._resync and not self._wake.is_set())

    async def close(self, grace: float) -> None:
        """Stop taking rows; let deliveries in flight finish for `grace` seconds, then
        cancel them (those rows stay pending); write what finished."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._flushing is not None:
            await self._flushing
        tasks = list(self._in_flight.values())
        if tasks:
            _, unfinished = await asyncio.wait(tasks, timeout=grace)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
            if unfinished:
                log.info("outbox %s: %d deliveries cut short at shutdown; they stay pending",
                         self.name, len(unfinished))
        if self._finished:
            await self._flush()

    # -- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if self._finished and self._flushing is None:
                self._flushing = asyncio.create_task(self._flush(),
                                                     name=f"outbox-{self.name}-results")
                self._flushing.add_done_callback(self._flushed)
            if self._closing:
                return
            if time.monotonic() - self._last_poll >= self._poll_interval:
                await self._poll()
            if (self._resync and not self._in_flight and not self._finished
                    and self._flushing is None):
                self._reset()
            breaker_wait = self.backend.available_in()
            if breaker_wait > 0:
                self._probing = True  # whoever opened it: the next call is a probe
            fetched = False
            if breaker_wait <= 0 and not self._resync and self._leading:
                if self._more and self._room():
                    await self._fill()
                    fetched = True
                self._dispatch()
            if fetched and self._more and self._room():
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), self._timeout(breaker_wait))
            except TimeoutError:
                pass

    def _room(self) -> bool:
        """Room in memory for a whole window of rows (not one query per row freed)."""
        return self._buffered <= _BUFFER - _WINDOW

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushing = None
        self._wake.set()

    def _timeout(self, breaker_wait: float) -> float:
        wait = self._poll_interval - (time.monotonic() - self._last_poll)
        if breaker_wait > 0:
            wait = min(wait, breaker_wait)
        elif self._sleeping:
            wait = min(wait, self._sleeping[0][0] - time.time())
        return max(wait, 0.001)

    async def _poll(self) -> None:
        """Re-read the counts (the CLI may have retried or dropped rows meanwhile): if the
        store's pending rows up to the cursor are not the ones in memory, read again."""
        self._last_poll = time.monotonic()
        # Only while no results are being written do the store and memory agree (the
        # loop, awaiting this, starts no write meanwhile).
        settled = self._flushing is None
        try:
            leading = await self._outbox.lead(self.name)
        except Exception as exc:  # cannot tell: deliver nothing another may be delivering
            log.error("outbox %s: cannot tell who delivers: %s", self.name, type(exc).__name__)
            leading = False
        if self._leading and not leading:
            self._resync = True  # another instance has the rows now: forget ours
        self._leading = leading
        try:
            queued_before = self._queued_total
            count = await self._outbox.count_pending(self.name)
            if self._queued_total == queued_before:
                self.count = count
            self.oldest = await self._outbox.oldest_pending(self.name) if self.count else None
            if self._cursor and settled:
                known = await self._outbox.count_due(self.name, self._cursor)
                if known != self._buffered:
                    self._resync = True
        except Exception as exc:  # the store is down: keep delivering what is in memory
            log.error("outbox %s: cannot read the outbox: %s", self.name, type(exc).__name__)
            return
        self._more = self._leading  # a standby reads nothing

    def _reset(self) -> None:
        """Forget the rows in memory and read them again from the first."""
        self._resync = False
        self._cursor = 0
        self._more = True
        self._buffered = 0
        self._queues.clear()
        self._ready.clear()
        self._failing.clear()
        self._sleeping.clear()

    async def _fill(self) -> None:
        try:
            rows = await self._outbox.due(self.name, self.backend.kind, self._cursor, _WINDOW)
        except Exception as exc:
            log.error("outbox %s: cannot read the outbox: %s", self.name, type(exc).__name__)
            self._more = False  # the next poll tries again
            return
        self._more = len(rows) == _WINDOW
        if rows:
            # A store may hand back rows behind the cursor (committed late): it never
            # moves back.
            self._cursor = max(self._cursor, rows[-1].id)
        now = time.time()
        for row in rows:
            self._buffered += 1
            key = row.patient_key
            if not key:
                self._place(row, now)
                continue
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = deque()
            queue.append(row)
            if len(queue) == 1:
                self._place(row, now)

    def _place(self, row: OutboxRow, now: float) -> None:
        """A row that nothing earlier holds back: ready now, or when its retry is due."""
        if row.next_at <= now:
            self._ready_now(row)
        else:
            heapq.heappush(self._sleeping, (row.next_at, row.id, row))

    def _dispatch(self) -> None:
        now = time.time()
        while self._sleeping and self._sleeping[0][0] <= now:
            _, _, row = heapq.heappop(self._sleeping)
            self._ready_now(row)
        limit = 1 if self._probing else self.policy.concurrency
        while (self._ready or self._failing) and len(self._in_flight) < limit:
            row = self._take()
            if row.payload is None:
                # A fhir backend needs the translated Bundle; a message stored without
                # one (routed before the backend was) cannot be sent.
                self._finished.append(_Finished(row, Permanent("no translated bundle",
                                                               status="not sent")))
                self._wake.set()
                continue
            self._in_flight[row.id] = asyncio.create_task(
                self._deliver(row, row.payload), name=f"outbox-{self.name}-{row.id}")

    def _ready_now(self, row: OutboxRow) -> None:
        heapq.heappush(self._failing if row.attempts else self._ready, (row.id, row))

    def _take(self) -> OutboxRow:
        """The oldest row that may go; while probing, the oldest that has not been failing
        (a poison row would fail the probe again: the breaker would stay open for every
        patient), a failing one only when no other is waiting."""
        ready, failing = self._ready, self._failing
        if ready and (self._probing or not failing or ready[0][0] < failing[0][0]):
            return heapq.heappop(ready)[1]
        return heapq.heappop(failing)[1]

    async def _deliver(self, row: OutboxRow, payload: bytes) -> None:
        delivery = Delivery(row.id, row.inbox_id, row.backend, row.attempts + 1, payload,
                            control_id_for(row.id), row.trace)
        started = time.perf_counter()
        try:
            try:
                verdict = await self.backend.deliver(delivery)
            except Exception as exc:  # a backend bug must not lose the row: try again later
                log.warning("outbox %d to %s: the delivery raised %s", row.id, self.name,
                            type(exc).__name__)
                verdict = Retry(type(exc).__name__, status="error", fault="message")
            elapsed = (time.perf_counter() - started) * 1000
            self._instruments.deliveries.add(1, self._verdict_attrs[_verdict_name(verdict)])
            self._instruments.delivery_ms.record(elapsed, self._backend_attrs)
            self._finished.append(_Finished(row, verdict))
            self._wake.set()
        finally:
            self._in_flight.pop(row.id, None)

    # -- writing results ----------------------------------------------------------------

    async def _flush(self) -> None:
        """Write the finished deliveries, then let each patient's next row go."""
        finished, self._finished = self._finished, []
        delivered: list[tuple[int, str]] = []
        done: list[OutboxRow] = []
        retried: list[OutboxRow] = []
        dead: list[tuple[int, int, str, str]] = []
        later: list[tuple[int, int, float, str, str]] = []
        policy = self.policy
        now = time.time()
        for item in finished:
            row, verdict = item.row, item.verdict
            attempts = row.attempts + 1
            if isinstance(verdict, Retry) and verdict.fault == "unsent":
                # Refused before the network (the breaker opened meanwhile): no attempt,
                # and the row has not been failing.
                next_at = now + (verdict.after if verdict.after is not None
                                 else policy.retry_base)
                later.append((row.id, row.attempts, next_at, verdict.status, verdict.reason))
                retried.append(replace(row, next_at=next_at))
            elif isinstance(verdict, Delivered):
                delivered.append((row.id, verdict.status))
                done.append(row)
            elif isinstance(verdict, Permanent):
                dead.append((row.id, attempts, verdict.status, verdict.reason))
                done.append(row)
            elif attempts >= policy.max_attempts:
                dead.append((row.id, attempts, verdict.status,
                             f"gave up after {attempts} attempts: {verdict.reason}"))
                done.append(row)
            else:
                next_at = now + retry_delay(attempts, policy.retry_base,
                                            policy.retry_max_delay, verdict.after)
                later.append((row.id, attempts, next_at, verdict.status, verdict.reason))
                retried.append(replace(row, attempts=attempts, next_at=next_at))
        try:
            if delivered:
                await self._outbox.mark_delivered(delivered)
            for row_id, attempts, status, error in dead:
                await self._outbox.dead(row_id, attempts, status, error)
            for row_id, attempts, next_at, status, error in later:
                await self._outbox.reschedule(row_id, attempts, next_at, status, error)
        except Exception as exc:
            # Not written: keep the results (and the patients' next rows waiting) and
            # write them again; a crash now only means these rows are sent again.
            log.error("outbox %s: cannot record %d results: %s", self.name, len(finished),
                      type(exc).__name__)
            self._finished[:0] = finished
            await asyncio.sleep(_STORE_RETRY)
            return
        dead_ids = {row_id for row_id, *_ in dead}
        for row_id, _, _, error in dead:
            log.warning("outbox %d to %s dead-lettered: %s; its patient's later deliveries "
                        "wait for it (isthmus outbox retry|drop %d)", row_id, self.name,
                        error, row_id)
        for row in done:
            self._advance(row, None, now, dead=row.id in dead_ids)
        for row in retried:
            self._advance(row, row, now)
        self.count = max(0, self.count - len(done))
        if not self.count:
            self.oldest = None
        for item in finished:
            verdict = item.verdict
            if not isinstance(verdict, Retry):
                self._probing = False  # answered: the backend is up
            elif verdict.fault != "message":
                self._probing = True
            # A failure that is the message's own leaves the pace as it is.

    def _advance(self, row: OutboxRow, again: OutboxRow | None, now: float, *,
                 dead: bool = False) -> None:
        """A patient's first row is done (`again` None) or waits for its retry. A dead
        row holds its patient's later rows: they leave memory, and the store does not
        read them again (`SqliteOutbox.due`) until the dead row is retried or dropped."""
        key = row.patient_key
        if again is not None:
            if key:
                self._queues[key][0] = again
            self._place(again, now)
            return
        self._buffered -= 1
        if not key:
            return
        queue = self._queues[key]
        queue.popleft()
        if queue and dead:
            self._buffered -= len(queue)
            queue.clear()
        if queue:
            self._place(queue[0], now)
        else:
            del self._queues[key]


def _verdict_name(verdict: Verdict) -> str:
    if isinstance(verdict, Delivered):
        return "delivered"
    return "retry" if isinstance(verdict, Retry) else "permanent"


class Dispatcher:
    """Delivers the outbox to every remote backend; the MLLP edge's `OutboxGate`."""

    def __init__(self, outbox: OutboxStore, backends: Mapping[str, Backend],
                 policies: Mapping[str, DeliveryPolicy], telemetry: Telemetry, *,
                 poll_interval: float = 1.0, close_grace: float = 5.0) -> None:
        self._outbox = outbox
        self._close_grace = close_grace
        instruments = _Instruments(telemetry)
        self._poll_interval = poll_interval
        self._instruments = instruments
        self._workers = {
            name: _Worker(outbox, backend, policies.get(name, DeliveryPolicy()),
                          poll_interval, instruments)
            for name, backend in backends.items()}
        meter = telemetry.meter
        meter.create_observable_gauge(
            "isthmus.outbox.depth", callbacks=[self._observe_depth], unit="{row}",
            description="Pending outbox rows per backend")
        meter.create_observable_gauge(
            "isthmus.outbox.oldest_age_seconds", callbacks=[self._observe_age], unit="s",
            description="Age of the oldest pending outbox row per backend")
        self._started = False

    async def start(self) -> None:
        """Read the pending counts and start one worker per backend."""
        counts = await self._outbox.pending_counts()
        for name, worker in self._workers.items():
            worker.count = counts.get(name, 0)
            worker.start()
        self._started = True

    async def attach(self, backend: Backend, policy: DeliveryPolicy,
                     poll_interval: float | None = None) -> None:
        """Start delivering to a backend that came after the start (a FHIR Subscription
        made active): its pending rows are read from the store. `poll_interval`: how
        often it looks for rows changed behind its back (an operator's retry); new rows
        wake it anyway."""
        if backend.name in self._workers:
            return
        worker = self._workers[backend.name] = _Worker(
            self._outbox, backend, policy, poll_interval or self._poll_interval,
            self._instruments)
        worker.count = await self._outbox.count_pending(backend.name)
        worker.start()

    async def detach(self, name: str) -> Backend | None:
        """Stop delivering to a backend (a Subscription turned off); its pending rows stay
        in the outbox. The backend, for its owner to close."""
        worker = self._workers.pop(name, None)
        if worker is None:
            return None
        await worker.close(self._close_grace)
        try:
            await self._outbox.resign(name)
        except Exception as exc:  # the lease connection went: the lead went with it
            log.warning("outbox %s: the lead could not be given up: %s", name,
                        type(exc).__name__)
        return worker.backend

    async def close(self) -> None:
        """Stop; deliveries still in flight after a short grace stay pending (sent again
        at the next start, with the same control id)."""
        if not self._started:
            return
        self._started = False
        await asyncio.gather(*(w.close(self._close_grace) for w in self._workers.values()))

    # -- OutboxGate ---------------------------------------------------------------------

    def full(self, backends: tuple[str, ...]) -> bool:
        for name in backends:
            worker = self._workers.get(name)
            if worker is not None and worker.count >= worker.policy.outbox_cap:
                return True
        return False

    def wake(self) -> None:
        """New rows somewhere (another instance's NOTIFY): read the store now."""
        for worker in self._workers.values():
            worker.wake_and_read()

    def queued(self, backends: tuple[str, ...]) -> None:
        for name in backends:
            worker = self._workers.get(name)
            if worker is not None:
                worker.queued()

    # -- looking on ---------------------------------------------------------------------

    def pending(self, backend: str) -> int:
        worker = self._workers.get(backend)
        return worker.count if worker is not None else 0

    async def drain(self, timeout: float) -> None:
        """Wait until no pending row is due and none is in flight (TimeoutError if not
        within `timeout`). Rows added behind the dispatcher's back (not through `queued`)
        are seen at the next poll."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for worker in self._workers.values():
            worker.wake()
        while not all(w.idle() for w in self._workers.values()):
            if loop.time() > deadline:
                busy = sorted(w.name for w in self._workers.values() if not w.idle())
                raise TimeoutError(f"the outbox did not drain in {timeout:g} s "
                                   f"(backends {', '.join(busy)})")
            await asyncio.sleep(0.005)

    def _observe_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(w.count, _backend(w.name)) for w in self._workers.values()]

    def _observe_age(self, options: CallbackOptions) -> Iterable[Observation]:
        now = time.time()
        return [Observation(max(0.0, now - w.oldest) if w.count and w.oldest else 0.0,
                            _backend(w.name)) for w in self._workers.values()]


def _backend(name: str) -> dict[str, AttributeValue]:
    return safe_attributes({"forward.backend": name})
