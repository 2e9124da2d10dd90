"""Console sign-in: users and their roles, sessions by an opaque cookie, CSRF tokens.

Sessions live in memory (a restart signs everyone out, which is the safe default for a
console that shows PHI). The cookie holds only a random id; the CSRF token is per session
and checked on every form post. Sign-in attempts are throttled per user name and peer.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.edge.console.passwords import dummy_hash, verify_password

ROLES = ("operator", "reviewer", "admin")
_FAILURES_BEFORE_WAIT = 5
_WAIT_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class User:
    name: str
    password_hash: str
    roles: frozenset[str]
    phi: bool = False

    def may(self, role: str) -> bool:
        """Whether the user holds `role` (admin holds every role)."""
        return role in self.roles or "admin" in self.roles


@dataclass(slots=True)
class Session:
    id: str
    user: User
    csrf: str
    last_seen: float


@dataclass
class Sessions:
    users: dict[str, User]
    idle_seconds: float
    clock: Callable[[], float] = time.monotonic
    _open: dict[str, Session] = field(default_factory=dict)
    _failures: dict[str, tuple[int, float]] = field(default_factory=dict)

    @classmethod
    def of(cls, users: Iterable[User], idle_seconds: float,
           clock: Callable[[], float] = time.monotonic) -> Sessions:
        return cls({u.name: u for u in users}, idle_seconds, clock)

    def sign_in(self, name: str, password: str, peer: str) -> Session | None:
        """A new session, or None (unknown user, wrong password, or too many failures:
        the same answer for each, after the same work)."""
        key = f"{name}\x00{peer}"
        failures, since = self._failures.get(key, (0, 0.0))
        waiting = failures >= _FAILURES_BEFORE_WAIT and self.clock() - since < _WAIT_SECONDS
        user = self.users.get(name)
        matched = verify_password(password, user.password_hash if user else dummy_hash())
        if waiting or user is None or not matched:
            self._failures[key] = (failures + 1, self.clock())
            return None
        self._failures.pop(key, None)
        session = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32),
                          self.clock())
        self._open[session.id] = session
        return session

    def find(self, session_id: str | None) -> Session | None:
        """The live session of a cookie; an idle one is ended here."""
        if not session_id:
            return None
        session = self._open.get(session_id)
        if session is None:
            return None
        now = self.clock()
        if now - session.last_seen > self.idle_seconds:
            del self._open[session_id]
            return None
        session.last_seen = now
        return session

    def end(self, session_id: str) -> None:
        self._open.pop(session_id, None)


def csrf_ok(session: Session, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(session.csrf, sent)
