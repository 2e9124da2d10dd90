"""The process layout: the edge process supervises the apply workers.

The edge (this process) owns the listeners, the inbox commit with its ACK and the audit
trail (the only audit writer: workers apply messages already on record and write none).
Each worker is `python -m gateway.app.worker_main`, told its settings on stdin and talking
over a socket pair, one JSON object a line:

    edge -> worker   {"wake": true}    rows were committed
                     {"stop": true}    finish the batch in hand and exit
    worker -> edge   {"ready": true}
                     {"done": [[inbox id, ""|reason], ...], "depth": n, "batch_ms": x}

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
import sys
from dataclasses import dataclass, field

import orjson

from gateway.canonical import Translation
from gateway.config import Settings
from gateway.hl7.errors import ErrorCode, Hl7Error
from gateway.ingest import Outcome

log = logging.getLogger(__name__)

# How long a stopping worker may take to finish its batch before it is killed.
_STOP_GRACE = 8.0
_RESTART_DELAY = 1.0


@dataclass
class WorkerStats:
    """What a worker last said about itself, for /metrics."""

    applied: int = 0
    failed: int = 0
    depth: int = 0
    batch_ms: float = 0.0
    restarts: int = 0


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    reader_task: asyncio.Task[None] | None = None
    stats: WorkerStats = field(default_factory=WorkerStats)


class Workers:
    """The apply workers, seen from the edge as one applier: `submit` notes a committed
    translation (the worker translates the stored row again), `drain` waits for what was
    submitted to be applied, `close` stops every worker after its batch in hand."""

    def __init__(self, settings: Settings, count: int) -> None:
        self._settings = settings
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

    async def start(self) -> None:
        for worker in self._workers:
            await self._spawn(worker)

    def submit(self, inbox_id: int, translation: Translation,
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
            self._send(worker, {"stop": True})
        for worker in self._workers:
            process = worker.process
            if process is None:
                continue
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
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, ValueError):
                line = b""
            if not line:
                break
            try:
                self._reported(worker, orjson.loads(line))
            except Exception as exc:  # a malformed report must not stop the supervisor
                log.error("apply worker %d: unreadable report: %s", worker.index,
                          type(exc).__name__)
        process = worker.process
        code = await process.wait() if process is not None else None
        if self._closing:
            return
        log.error("apply worker %d exited (code %s); starting it again", worker.index, code)
        worker.stats.restarts += 1
        await asyncio.sleep(_RESTART_DELAY)
        if not self._closing:
            await self._spawn(worker)
            self._send(worker, {"wake": True})

    def _reported(self, worker: _Worker, report: dict[str, object]) -> None:
        done = report.get("done")
        if not isinstance(done, list):
            return
        stats = worker.stats
        stats.depth = int(report.get("depth", 0))  # type: ignore[call-overload]
        stats.batch_ms = float(report.get("batch_ms", 0.0))  # type: ignore[arg-type]
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
            self._send(worker, {"wake": True})

    def _send(self, worker: _Worker, command: dict[str, bool]) -> None:
        writer = worker.writer
        if writer is None or writer.is_closing():
            return
        try:
            writer.write(orjson.dumps(command) + b"\n")
        except (ConnectionError, RuntimeError):
            pass  # the worker is gone; the supervisor starts it again
