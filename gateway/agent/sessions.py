"""What the agent API remembers between calls, in memory and for a short time: verified
sessions (with what was prefetched for them), failed verifications per call and per
phone, and the first answer to each Idempotency-Key.

A session token is a random secret shown once; only its SHA-256 is kept. Ending or
expiring a session drops everything held for it (the purge at session end).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Clock = Callable[[], float]

# The purposes and what each may do: the minimum-necessary profile of a session.
PURPOSES: dict[str, frozenset[str]] = {
    "scheduling": frozenset({"appointments", "slots", "book", "cancel", "reschedule"}),
    "appointment_lookup": frozenset({"appointments"}),
    "refill": frozenset({"medications", "refill"}),
}
# What the purpose prefetches on verification (the next calls answer from the cache).
PREFETCH: dict[str, tuple[str, ...]] = {
    "scheduling": ("appointments",),
    "appointment_lookup": ("appointments",),
    "refill": ("medications",),
}


@dataclass
class Session:
    """One verified caller: the patient, the purpose, and what was fetched for them."""

    id: str
    client_id: str
    call_id: str
    purpose: str
    patient_id: str
    first_name: str | None
    last_name_initial: str | None
    expires_at: float
    # Prefetched and fetched data, by kind ('appointments', 'medications', 'names').
    cache: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[Any]] = field(default_factory=dict)

    @property
    def patient(self) -> str:
        return f"Patient/{self.patient_id}"

    def may(self, operation: str) -> bool:
        return operation in PURPOSES[self.purpose]

    def purge(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
        self.cache.clear()


class Sessions:
    """Sessions by token digest; an expired one is purged when next seen or swept."""

    def __init__(self, ttl: float, clock: Clock = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._by_digest: dict[bytes, Session] = {}

    def open(self, client_id: str, call_id: str, purpose: str, patient_id: str,
             first_name: str | None, last_name_initial: str | None) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(uuid.uuid4().hex, client_id, call_id, purpose, patient_id,
                          first_name, last_name_initial, self.clock() + self.ttl)
        self._by_digest[_digest(token)] = session
        self.sweep()
        return token, session

    def get(self, token: str, client_id: str) -> Session | None:
        """The live session of this token, for the client it was issued to."""
        digest = _digest(token)
        session = self._by_digest.get(digest)
        if session is None:
            return None
        if self.clock() >= session.expires_at:
            self._drop(digest)
            return None
        return session if session.client_id == client_id else None

    def end(self, token: str) -> bool:
        return self._drop(_digest(token))

    def sweep(self) -> None:
        now = self.clock()
        for digest in [d for d, s in self._by_digest.items() if now >= s.expires_at]:
            self._drop(digest)

    def close(self) -> None:
        for digest in list(self._by_digest):
            self._drop(digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    def _drop(self, digest: bytes) -> bool:
        session = self._by_digest.pop(digest, None)
        if session is None:
            return False
        session.purge()
        return True


class Attempts:
    """Failed verifications per key ('call:<call_id>', 'phone:<E.164>') in a window."""

    def __init__(self, allowed: int, window: float, clock: Clock = time.monotonic) -> None:
        self.allowed = allowed
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def locked_for(self, keys: list[str]) -> float:
        """Seconds until these keys may try again (0: they may now)."""
        now = self.clock()
        wait = 0.0
        for key in keys:
            failures = self._recent(key, now)
            if len(failures) >= self.allowed:
                wait = max(wait, failures[len(failures) - self.allowed] + self.window - now)
        return wait

    def fail(self, keys: list[str]) -> int:
        """Record a failure for every key; the attempts left (for the most used key)."""
        now = self.clock()
        left = self.allowed
        for key in keys:
            failures = self._recent(key, now)
            failures.append(now)
            left = min(left, self.allowed - len(failures))
        return max(0, left)

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(key, deque())
        while failures and failures[0] + self.window <= now:
            failures.popleft()
        if len(self._failures) > 100_000:  # bounded: forget keys whose failures all left
            for stale in [k for k, v in self._failures.items() if not v and k != key]:
                del self._failures[stale]
        return failures


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


class Idempotency:
    """The first answer to (client, Idempotency-Key), with the request it answered; a
    retry that arrives while the first is still running waits for it."""

    def __init__(self, ttl: float, clock: Clock = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._answers: dict[tuple[str, str], tuple[str, float, asyncio.Future[Answer]]] = {}

    def claim(self, client_id: str, key: str, fingerprint: str
              ) -> tuple[asyncio.Future[Answer], bool]:
        """(the future answer, True if this caller must produce it). A key reused for
        another request raises ValueError."""
        self._expire()
        slot = (client_id, key)
        held = self._answers.get(slot)
        if held is not None:
            if held[0] != fingerprint:
                raise ValueError("reused")
            return held[2], False
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._answers[slot] = (fingerprint, self.clock() + self.ttl, future)
        return future, True

    def forget(self, client_id: str, key: str) -> None:
        """The first attempt failed before changing anything: a retry runs again."""
        held = self._answers.pop((client_id, key), None)
        if held is not None and not held[2].done():
            held[2].cancel()

    def _expire(self) -> None:
        now = self.clock()
        for slot in [s for s, (_, until, f) in self._answers.items()
                     if until <= now and f.done()]:
            del self._answers[slot]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
