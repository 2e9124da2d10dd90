"""Group commit: callers queue items, one writer commits them in batches, each caller's
future resolves once its item is durable (or fails with what the store says).

While one batch is being written the next gathers, so N concurrent callers cost about one
commit, not N. The inbox and the audit trail use it on both backends; what a batch is
(one multi-row INSERT, a transaction) is the store's `commit` callable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from gateway.store.errors import StoreUnavailable

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommitter(Generic[Item, Result]):
    """One writer task committing queued items in batches, in submission order.

    `commit(items)` writes a batch and returns one result per item, in order; if it
    raises, every item of the batch fails with `failure(exc)` (nothing of it is durable).
    A batch holds at most `max_batch` items and, past its first, `max_bytes` of
    `size(item)`. `after(count, ok)` follows each batch: one call a batch. With `settle`
    the writer lets that many event-loop turns pass before taking each batch, so callers
    already under way join it (fewer, larger commits; the latency of a few loop turns).
    """

    def __init__(self, commit: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]], *,
                 name: str, logger: logging.Logger, max_batch: int,
                 failure: Callable[[Exception], Exception],
                 closed: str, size: Callable[[Item], int] | None = None,
                 max_bytes: int = 0,
                 after: Callable[[int, bool], None] | None = None,
                 settle: int = 0) -> None:
        self._commit_batch = commit
        self._settle = settle
        self._name = name
        self._log = logger
        self._max_batch = max(1, max_batch)
        self._failure = failure
        self._closed = closed
        self._size = size
        self._max_bytes = max_bytes
        self._after = after
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0
        self.committed = 0

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name=f"{self._name}-writer")

    def submit(self, item: Item) -> asyncio.Future[Result]:
        """Queue an item for the next group commit; the future resolves once durable."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        if self._closing or self._writer is None:
            future.set_exception(StoreUnavailable(self._closed))
            return future
        self._pending.append((item, future))
        self._wakeup.set()
        return future

    async def close(self) -> None:
        """Commit what is queued and take no more."""
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer

    def summary(self, store: str, what: str) -> None:
        """One line at close: how well the commits grouped."""
        if self.batches:
            self._log.info("%s closed: %d %s in %d group commits (%.1f per commit)",
                           store, self.committed, what, self.batches,
                           self.committed / self.batches)

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                for _ in range(self._settle):
                    await asyncio.sleep(0)
                await self._commit(self._next_batch())
            if self._closing:
                return

    def _next_batch(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        """The oldest pending items, bounded in count and (large messages) in bytes."""
        size = count = 0
        for item, _ in self._pending:
            if count == self._max_batch:
                break
            if self._size is not None:
                grown = size + self._size(item)
                if count and grown > self._max_bytes:
                    break
                size = grown
            count += 1
        batch = self._pending[:count]
        del self._pending[:count]
        return batch

    async def _commit(self, batch: Sequence[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._commit_batch([item for item, _ in batch])
        except Exception as exc:  # any failure to commit means: not durable, not accepted
            self._log.error("%s commit failed for a batch of %d: %s", self._name,
                            len(batch), type(exc).__name__)
            error = self._failure(exc)
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if self._after is not None:
                self._after(len(batch), False)
            return
        self.batches += 1
        self.committed += len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
        if self._after is not None:
            self._after(len(batch), True)
