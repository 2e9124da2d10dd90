"""Waiting for a result instead of sleeping for a guess: `await eventually(check)` polls a
condition and fails naming what it waited for; `ManualClock` stands in for `time.monotonic`
where the code under test takes a clock."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


async def eventually(check: Callable[[], bool | Awaitable[bool]], *, timeout: float = 5.0,
                     interval: float = 0.01, what: str | None = None) -> None:
    """Poll `check` (plain or async) every `interval` s until it is true; after `timeout` s
    fail with an AssertionError naming `what` (by default the check's source)."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for "
                                 f"{what or _describe(check)}")
        await asyncio.sleep(interval)


def _describe(check: Callable[..., object]) -> str:
    """The source line of a lambda, or the function's name: enough to find the wait."""
    try:
        return inspect.getsource(check).strip()
    except (OSError, TypeError):
        return getattr(check, "__qualname__", repr(check))


@dataclass
class ManualClock:
    """A monotonic clock the test moves by hand (`clock.now += 30`)."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now
