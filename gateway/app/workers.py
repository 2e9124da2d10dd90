"""The process layout: the edge process supervises the apply workers and translators.

The edge (this process) owns the listeners, the inbox commit with its ACK and the audit
trail (the only audit writer: workers apply messages already on record and write none).
Each child is `python -m gateway.app.worker_main` or `gateway.app.translator_main`, told
its settings on stdin and talking over a socket pair, one pickled tuple a frame (`wire`;
4-byte length first; both ends are ours):

    edge -> translator ("translate", seq, request)  translate a message for its ACK
                                                     (`request_to_wire`)
    translator -> edge ("ready",)                    it takes translations from now on
                       ("translated", seq, wire, kept)  the outcome (`prepare.to_wire`);
                                                     kept: (key, the Translation's wire
                                                     form, `canonical/wire.py`) or None
    edge -> worker     ("keep", key, Translation's wire form)  for its row
                       ("wake",)                     rows were committed (the first:
                                                     start reading the inbox)
                       ("stop",)                     finish the batch in hand and exit
    worker -> edge     ("ready",)                    answered by the keeps held for it,
                                                     then ("wake",)
                       ("done", [(inbox id, ""|reason), ...], depth, batch ms,
                        store write ms, rows translated again)

A small message is translated for its ACK by a translator process, which does nothing
else: in the apply worker it waited behind the applies (their event loop turns, and the
interpreter lock held by the FHIR store's writer thread). The edge hands the Translation
on to the worker whose share holds the patient before it commits the row, so the worker
does not translate it again; a large one (`processes.offload_bytes`) is translated in the
large-frame process instead, so it holds up no translator.

The translators are started first, while the edge opens its stores, and the edge listens
once they are ready (`_READY_WAIT` at most): a message it translated itself was
translated again by its apply worker. A Translation for an apply worker that is not
ready yet (starting, or started again) is held here, bounded as the worker bounds what it
keeps, and handed over when it says ready; it reads the inbox only after that.

A child dies with the edge (its parent-death signal, and the socket's end of file); one
that dies is started again; an apply worker's rows wait, committed and marked
`translated`, until then, and the edge translates for itself while no translator is
ready. Each apply worker holds a lock file in the data dir while it runs, so a new one
starts applying only once the one it replaces is gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics

from gateway.app.wire import frame, receive, request_to_wire, send
from gateway.canonical import Translation
from gateway.config import Settings
from gateway.hl7.errors import ErrorCode, Hl7Error
from gateway.ingest.applier import Outcome
from gateway.ingest.prepare import Prepared, Request, from_wire, settle
from gateway.ingest.worker import KEPT_ENTRY_BYTES, KEPT_MAX, kept_bytes_max, share_of

log = logging.getLogger(__name__)

# How long a stopping worker may take to finish its batch before it is killed.
_STOP_GRACE = 8.0
_RESTART_DELAY = 1.0
# How long the edge waits for its translators before it listens anyway (translating for
# itself meanwhile): a translator's start is 1-2 s, over 10 s on a loaded machine.
_READY_WAIT = 30.0
# Translations one translator may owe the edge before the edge translates for itself.
_MAX_ASKED = 16
# Reports kept for rows not yet submitted (`Workers._early`): a burst's worth.
_EARLY_MAX = 20_000
_WORKER = "gateway.app.worker_main"
_TRANSLATOR = "gateway.app.translator_main"


@dataclass
class WorkerStats:
    """What a worker last said about itself, for /metrics."""

    applied: int = 0
    failed: int = 0
    depth: int = 0
    batch_ms: float = 0.0
    write_ms: float = 0.0  # the FHIR store's last write transaction (its lock held)
    restarts: int = 0
    translated_again: int = 0  # rows it translated: no translation was handed on


@dataclass
class _Child:
    module: str  # _WORKER or _TRANSLATOR
    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    reader_task: asyncio.Task[None] | None = None
    stats: WorkerStats = field(default_factory=WorkerStats)
    # A translator's translations asked and not answered yet, by sequence number, with
    # the apply worker that takes the message's patient.
    asked: dict[int, tuple[asyncio.Future[Prepared], int]] = field(default_factory=dict)
    # Set once a child has loaded its tables (and opened the stores); until then the edge
    # translates, and holds the translations for an apply worker (`held`).
    up: asyncio.Event = field(default_factory=asyncio.Event)
    held: list[tuple[bytes, bytes]] = field(default_factory=list)
    held_bytes: int = 0
    # Frames posted during this turn of the event loop, written together at its end: one
    # write (a system call) for what the turn's messages asked, not one each.
    outgoing: list[bytes] = field(default_factory=list)

    def post(self, item: tuple[Any, ...]) -> None:
        """Send `item` at the end of this turn, after what was posted before it."""
        if not self.outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outgoing.append(frame(item))

    def _flush(self) -> None:
        if self.writer is not None:
            send(self.writer, b"".join(self.outgoing))
        self.outgoing.clear()

    @property
    def name(self) -> str:
        return f"{'apply worker' if self.module == _WORKER else 'translator'} {self.index}"

    @property
    def ready(self) -> bool:
        return self.up.is_set()

    @property
    def open(self) -> bool:
        return self.ready and self.writer is not None and not self.writer.is_closing()


def translator_count(workers: int) -> int:
    """Translator processes beside `workers` apply workers: one translates ADT^A01 at
    ~4,000/s, more than two workers apply."""
    return max(1, (workers + 1) // 2)


class Workers:
    """The apply workers and translators, seen from the edge as one applier and one
    `Translators`: `translate` asks a translator, `submit` notes a committed row (its
    worker applies it with the translation handed on, or translates the stored row
    again), `drain` waits for what was submitted to be applied, `close` stops every worker
    after its batch in hand."""

    def __init__(self, settings: Settings, count: int) -> None:
        self._settings = settings
        self._seq = 0
        # Held for an apply worker that is starting: no more than it keeps itself
        # (`InboxFollower.keep`: its share of an eighth of the memory budget).
        self._held_max_bytes = kept_bytes_max(settings.processes.memory_budget_bytes, count)
        self._workers = [_Child(_WORKER, i) for i in range(count)]
        self._translators = [_Child(_TRANSLATOR, i) for i in range(translator_count(count))]
        self._pending: set[int] = set()
        self._outcomes: dict[int, Outcome] = {}
        # Rows a worker reported before the edge submitted them: the inbox commit is
        # visible (and applied) while the edge still waits for the audit commit. Bounded:
        # rows the edge never submits (a start-up's backlog, replays) are reported too.
        self._early: dict[int, str] = {}
        self._wake_scheduled = False
        self._closing = False
        self._drained = asyncio.Event()
        self._drained.set()

    @property
    def stats(self) -> list[WorkerStats]:
        return [w.stats for w in self._workers]

    @property
    def pending(self) -> int:
        """Messages committed and handed on, not yet reported applied."""
        return len(self._pending)

    def observe(self, meter: metrics.Meter) -> None:
        """Per-process figures for /metrics, read when metrics are collected."""
        def by_worker(value: Callable[[WorkerStats], float]) -> metrics.CallbackT:
            def observe(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
                return [metrics.Observation(value(w.stats), {"process": f"worker-{w.index}"})
                        for w in self._workers]
            return observe

        meter.create_observable_gauge(
            "isthmus.worker.queue_depth", callbacks=[by_worker(lambda s: s.depth)],
            description="inbox rows an apply worker has read and not yet applied")
        meter.create_observable_gauge(
            "isthmus.worker.batch_duration", unit="ms",
            callbacks=[by_worker(lambda s: s.batch_ms)],
            description="an apply worker's last batch, read to marked")
        meter.create_observable_gauge(
            "isthmus.worker.store_write_duration", unit="ms",
            callbacks=[by_worker(lambda s: s.write_ms)],
            description="an apply worker's last FHIR store group commit, the write lock "
                        "held")
        meter.create_observable_counter(
            "isthmus.worker.applied", callbacks=[by_worker(lambda s: s.applied)],
            description="messages an apply worker applied to the FHIR store")
        meter.create_observable_counter(
            "isthmus.worker.failed", callbacks=[by_worker(lambda s: s.failed)],
            description="messages an apply worker could not apply")
        meter.create_observable_counter(
            "isthmus.worker.translated_again",
            callbacks=[by_worker(lambda s: s.translated_again)],
            description="inbox rows an apply worker translated itself: no translation "
                        "made for the ACK was handed on (a restart, no translator ready)")
        meter.create_observable_counter(
            "isthmus.worker.restarts", callbacks=[by_worker(lambda s: s.restarts)],
            description="times an apply worker exited and was started again")
        meter.create_observable_gauge(
            "isthmus.apply.pending", callbacks=[lambda _: [metrics.Observation(
                self.pending, {"process": "edge"})]],
            description="messages committed by the edge and not yet applied by a worker")

    async def start_translators(self) -> None:
        """Start the translators: first, so that their start (imports, tables) overlaps
        the edge's own."""
        for child in self._translators:
            await self._spawn(child)

    async def start(self) -> None:
        """Start the apply workers (after the edge has opened the stores)."""
        for child in self._workers:
            await self._spawn(child)

    async def translators_ready(self) -> bool:
        """Wait until every translator is ready (`_READY_WAIT` at most): until then the
        edge translates for the ACKs itself, and its apply worker again. False: not all
        are (the edge translates for those meanwhile)."""
        try:
            await asyncio.wait_for(asyncio.gather(*(t.up.wait() for t in self._translators)),
                                   _READY_WAIT)
        except TimeoutError:
            log.warning("the translators are not ready after %g s: the edge translates "
                        "meanwhile", _READY_WAIT)
            return False
        return True

    def translate(self, request: Request) -> asyncio.Future[Prepared] | None:
        """A translation for the handler, by the least busy translator (None: translate
        it here: none is ready, or each owes `_MAX_ASKED` already, or all is stopping)."""
        if self._closing:
            return None
        translator = min((t for t in self._translators if t.open), default=None,
                         key=lambda t: len(t.asked))
        if translator is None or len(translator.asked) >= _MAX_ASKED:
            # Starting (again), or behind: the edge's spare time translates meanwhile, and
            # the worker translates the row again when it comes up.
            return None
        assert translator.writer is not None
        self._seq += 1
        future: asyncio.Future[Prepared] = asyncio.get_running_loop().create_future()
        translator.asked[self._seq] = (future,
                                       share_of(request.patient_key, len(self._workers)))
        translator.post(("translate", self._seq, request_to_wire(request)))
        return future

    def submit(self, inbox_id: int, translation: Translation | None,
               outcome: Outcome | None = None) -> None:
        if self._closing:
            return
        if inbox_id in self._early:
            problem = self._early.pop(inbox_id)
            if outcome is not None:
                outcome(Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR, problem)
                        if problem else None)
            return
        self._pending.add(inbox_id)
        self._drained.clear()
        if outcome is not None:
            self._outcomes[inbox_id] = outcome
        if not self._wake_scheduled:  # one wake-up per turn of the loop, not per message
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake)

    async def drain(self) -> None:
        """Until every message submitted so far has been applied (or refused)."""
        await self._drained.wait()

    async def close(self) -> None:
        """Stop every worker after the batch it holds; kill one that overstays (once:
        a second call finds them stopped)."""
        if self._closing:
            return
        self._closing = True
        children = (*self._workers, *self._translators)
        for child in children:
            if child.ready and child.writer is not None:
                send(child.writer, ("stop",))
            elif child.process is not None and child.process.returncode is None:
                child.process.terminate()  # still starting: holds nothing yet
        await asyncio.gather(*(self._stopped(child) for child in children))

    async def _stopped(self, child: _Child) -> None:
        process = child.process
        if process is not None:
            try:
                await asyncio.wait_for(process.wait(), _STOP_GRACE)
            except TimeoutError:
                log.warning("%s did not stop in %g s; killed (an apply worker's rows are "
                            "applied at the next start)", child.name, _STOP_GRACE)
                process.kill()
                await process.wait()
        if child.reader_task is not None:
            await asyncio.gather(child.reader_task, return_exceptions=True)
        if child.writer is not None:
            child.writer.close()

    # -- one child process ----------------------------------------------------------------

    async def _spawn(self, child: _Child) -> None:
        ours, theirs = socket.socketpair()
        share = [str(len(self._workers))] if child.module == _WORKER else []
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", child.module, str(theirs.fileno()), str(child.index),
                *share, str(os.getpid()), stdin=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        assert process.stdin is not None
        process.stdin.write(pickle.dumps(self._settings))
        process.stdin.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        child.process, child.writer = process, writer
        child.reader_task = asyncio.create_task(
            self._listen(child, reader), name=child.name.replace(" ", "-"))

    async def _listen(self, child: _Child, reader: asyncio.StreamReader) -> None:
        """Read the child's reports until it exits; start it again unless stopping."""
        while (item := await receive(reader)) is not None:
            try:
                if item[0] == "translated":
                    self._translated(child, item[1], item[2], item[3])
                elif item[0] == "ready":
                    self._ready(child)
                elif item[0] == "done":
                    self._reported(child, *item[1:6])
            except Exception as exc:  # a malformed report must not stop the supervisor
                log.error("%s: unreadable report: %s", child.name, type(exc).__name__)
        child.up.clear()
        # Whatever it was asked is translated here instead (the handler falls back).
        for future, _ in child.asked.values():
            settle(future, ConnectionError("the translator is gone"))
        child.asked.clear()
        process = child.process
        code = await process.wait() if process is not None else None
        if self._closing:
            return
        log.error("%s exited (code %s); starting it again", child.name, code)
        child.stats.restarts += 1
        await asyncio.sleep(_RESTART_DELAY)
        if not self._closing:
            await self._spawn(child)  # an apply worker reads its rows once it is ready

    def _translated(self, translator: _Child, seq: int, wire: tuple[Any, ...],
                    kept: tuple[bytes, bytes] | None) -> None:
        """A translator's answer: the Translation to the worker that will apply it (before
        the row can commit, so its "wake" comes after on the same socket), the outcome to
        the handler."""
        asked = translator.asked.pop(seq, None)
        if asked is None:
            return
        future, share = asked
        worker = self._workers[share]
        if kept is not None and not future.done():
            if worker.open:
                worker.post(("keep", *kept))
            else:
                self._hold(worker, kept)
        settle(future, from_wire(wire))

    def _hold(self, worker: _Child, kept: tuple[bytes, bytes]) -> None:
        """Keep a Translation for an apply worker that is starting, for when it is ready;
        when full, drop it (the worker translates the row again)."""
        size = len(kept[1]) + KEPT_ENTRY_BYTES  # counted as the worker counts it
        if (self._closing or len(worker.held) >= KEPT_MAX
                or worker.held_bytes + size > self._held_max_bytes):
            return
        worker.held.append(kept)
        worker.held_bytes += size

    def _ready(self, child: _Child) -> None:
        """A child is ready. An apply worker is handed what was held for it, then its first
        wake: it reads the inbox only after that, so those rows are not translated twice."""
        child.up.set()
        if child.module != _WORKER:
            return
        for kept in child.held:
            child.post(("keep", *kept))
        child.held.clear()
        child.held_bytes = 0
        child.post(("wake",))

    def _reported(self, worker: _Child, done: list[tuple[int, str]], depth: int,
                  batch_ms: float, write_ms: float, again: int) -> None:
        stats = worker.stats
        stats.depth, stats.batch_ms, stats.write_ms = depth, batch_ms, write_ms
        stats.translated_again += again
        for inbox_id, problem in done:
            if problem:
                stats.failed += 1
            else:
                stats.applied += 1
            if inbox_id not in self._pending:
                if len(self._early) >= _EARLY_MAX:
                    del self._early[next(iter(self._early))]
                self._early[inbox_id] = problem
                continue
            self._pending.discard(inbox_id)
            outcome = self._outcomes.pop(inbox_id, None)
            if outcome is not None:
                outcome(Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR, problem)
                        if problem else None)
        if not self._pending:
            self._drained.set()

    def _wake(self) -> None:
        self._wake_scheduled = False
        for worker in self._workers:
            if worker.open:  # one starting is woken when it says ready (`_ready`)
                worker.post(("wake",))
