"""The process layout: the edge process supervises the apply workers.

The edge (this process) owns the listeners, the inbox commit with its ACK and the audit
trail (the only audit writer: workers apply messages already on record and write none).
Each worker is `python -m gateway.app.worker_main`, told its settings on stdin and talking
over a socket pair, one pickled tuple a frame (4-byte length first; both ends are ours):

    edge -> worker   ("translate", seq, Request)   translate a message for its ACK
                     ("wake",)                     rows were committed
                     ("stop",)                     finish the batch in hand and exit
    worker -> edge   ("ready",)                    it takes translations from now on
                     ("translated", seq, wire)     the outcome (`prepare.to_wire`)
                     ("done", [(inbox id, ""|reason), ...], depth, batch ms,
                      store write ms)

A message is translated for its ACK by the worker whose share holds its patient, which
keeps the translation to apply once the row commits (no second translation); a large
one (`processes.offload_bytes`) on a thread of the edge instead, so it holds up no worker.

A worker dies with the edge (its parent-death signal, and the socket's end of file); a
worker that dies is started again, and its rows wait, committed and marked `translated`,
until then. Each holds a lock file in the data dir while it runs, so a new worker starts
applying only once the one it replaces is gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics

from gateway.canonical import Translation
from gateway.config import Settings
from gateway.hl7.errors import ErrorCode, Hl7Error
from gateway.ingest import Outcome
from gateway.ingest.prepare import Prepared, Request, from_wire, settle
from gateway.ingest.worker import share_of

log = logging.getLogger(__name__)

# How long a stopping worker may take to finish its batch before it is killed.
_STOP_GRACE = 8.0
_RESTART_DELAY = 1.0
# Translations one worker may owe the edge before the edge translates for itself.
_MAX_ASKED = 16


_LENGTH = struct.Struct(">I")


def send(writer: asyncio.StreamWriter, item: tuple[Any, ...]) -> None:
    """One frame to the other process (nothing if it is gone)."""
    if writer.is_closing():
        return
    body = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        writer.write(_LENGTH.pack(len(body)) + body)
    except (ConnectionError, RuntimeError):
        pass  # the other end is gone; its supervisor (or the worker's EOF) handles it


async def receive(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next frame from the other process; None at its end."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        item = pickle.loads(await reader.readexactly(_LENGTH.unpack(head)[0]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    assert isinstance(item, tuple)
    return item


@dataclass
class WorkerStats:
    """What a worker last said about itself, for /metrics."""

    applied: int = 0
    failed: int = 0
    depth: int = 0
    batch_ms: float = 0.0
    write_ms: float = 0.0  # the FHIR store's last write transaction (its lock held)
    restarts: int = 0


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    reader_task: asyncio.Task[None] | None = None
    stats: WorkerStats = field(default_factory=WorkerStats)
    # Translations asked of this worker and not answered yet, by sequence number.
    asked: dict[int, asyncio.Future[Prepared]] = field(default_factory=dict)
    # Until a worker has loaded its tables and opened the stores, the edge translates.
    ready: bool = False


class Workers:
    """The apply workers, seen from the edge as one applier: `submit` notes a committed
    translation (the worker translates the stored row again), `drain` waits for what was
    submitted to be applied, `close` stops every worker after its batch in hand."""

    def __init__(self, settings: Settings, count: int) -> None:
        self._settings = settings
        self._seq = 0
        self._workers = [_Worker(i) for i in range(count)]
        self._pending: set[int] = set()
        self._outcomes: dict[int, Outcome] = {}
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
            "isthmus.worker.restarts", callbacks=[by_worker(lambda s: s.restarts)],
            description="times an apply worker exited and was started again")
        meter.create_observable_gauge(
            "isthmus.apply.pending", callbacks=[lambda _: [metrics.Observation(
                self.pending, {"process": "edge"})]],
            description="messages committed by the edge and not yet applied by a worker")

    async def start(self) -> None:
        for worker in self._workers:
            await self._spawn(worker)

    def translate(self, request: Request) -> asyncio.Future[Prepared] | None:
        """A translation for the handler, by the worker that applies its patient (None:
        translate it here: the worker is starting, or everything is stopping)."""
        if self._closing:
            return None
        worker = self._workers[share_of(request.patient_key, len(self._workers))]
        if not worker.ready or worker.writer is None or worker.writer.is_closing():
            return None  # starting (again): translated here meanwhile
        if len(worker.asked) >= _MAX_ASKED:
            # The worker is behind (applying takes it longer than translating takes the
            # edge): the edge's spare time translates, so ACKs do not wait for applies;
            # the worker translates the row again when it comes up.
            return None
        self._seq += 1
        future: asyncio.Future[Prepared] = asyncio.get_running_loop().create_future()
        worker.asked[self._seq] = future
        send(worker.writer, ("translate", self._seq, request))
        return future

    def submit(self, inbox_id: int, translation: Translation | None,
               outcome: Outcome | None = None) -> None:
        if self._closing:
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
        """Stop every worker after the batch it holds; kill one that overstays."""
        self._closing = True
        for worker in self._workers:
            if worker.ready and worker.writer is not None:
                send(worker.writer, ("stop",))
            elif worker.process is not None and worker.process.returncode is None:
                worker.process.terminate()  # still starting: holds nothing yet
        await asyncio.gather(*(self._stopped(worker) for worker in self._workers))

    async def _stopped(self, worker: _Worker) -> None:
        process = worker.process
        if process is not None:
            try:
                await asyncio.wait_for(process.wait(), _STOP_GRACE)
            except TimeoutError:
                log.warning("apply worker %d did not stop in %g s; killed (its rows are "
                            "applied at the next start)", worker.index, _STOP_GRACE)
                process.kill()
                await process.wait()
        if worker.reader_task is not None:
            await asyncio.gather(worker.reader_task, return_exceptions=True)
        if worker.writer is not None:
            worker.writer.close()

    # -- one worker ------------------------------------------------------------------------

    async def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.app.worker_main", str(theirs.fileno()),
                str(worker.index), str(len(self._workers)), str(os.getpid()),
                stdin=asyncio.subprocess.PIPE, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        assert process.stdin is not None
        process.stdin.write(pickle.dumps(self._settings))
        process.stdin.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        worker.process, worker.writer = process, writer
        worker.reader_task = asyncio.create_task(self._listen(worker, reader),
                                                 name=f"apply-worker-{worker.index}")

    async def _listen(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        """Read the worker's reports until it exits; start it again unless stopping."""
        while (item := await receive(reader)) is not None:
            try:
                if item[0] == "translated":
                    future = worker.asked.pop(item[1], None)
                    if future is not None:
                        settle(future, from_wire(item[2]))
                elif item[0] == "ready":
                    worker.ready = True
                elif item[0] == "done":
                    self._reported(worker, item[1], item[2], item[3], item[4])
            except Exception as exc:  # a malformed report must not stop the supervisor
                log.error("apply worker %d: unreadable report: %s", worker.index,
                          type(exc).__name__)
        worker.ready = False
        # Whatever it was asking is translated here instead (the handler falls back).
        for future in worker.asked.values():
            settle(future, ConnectionError("the apply worker is gone"))
        worker.asked.clear()
        process = worker.process
        code = await process.wait() if process is not None else None
        if self._closing:
            return
        log.error("apply worker %d exited (code %s); starting it again", worker.index, code)
        worker.stats.restarts += 1
        await asyncio.sleep(_RESTART_DELAY)
        if not self._closing:
            await self._spawn(worker)
            if worker.writer is not None:
                send(worker.writer, ("wake",))

    def _reported(self, worker: _Worker, done: list[tuple[int, str]], depth: int,
                  batch_ms: float, write_ms: float) -> None:
        stats = worker.stats
        stats.depth, stats.batch_ms, stats.write_ms = depth, batch_ms, write_ms
        for inbox_id, problem in done:
            if problem:
                stats.failed += 1
            else:
                stats.applied += 1
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
            if worker.writer is not None:
                send(worker.writer, ("wake",))
