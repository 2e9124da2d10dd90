"""What every backend shares: one delivery in, one verdict out; and the facade's answer.

The outbox hands a backend one `Delivery` at a time (per patient, in order) and acts on
the verdict: `Delivered` ends it, `Retry` schedules another attempt (never sooner than the
backend asked), `Permanent` dead-letters it for an operator. A `Retry` says whose failure
it was (`Fault`), so that one message the backend keeps refusing slows only itself.
Verdict reasons are written to the outbox and shown by `isthmus outbox`, so they name a
status or a rule, never a value from the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from multidict import CIMultiDict

# The backend errors are defined in errors.py; imported here too for the old import path.
from gateway.forward.errors import BackendTimeout as BackendTimeout
from gateway.forward.errors import BackendUnavailable as BackendUnavailable


@dataclass(frozen=True, slots=True)
class Delivery:
    """One outbox row ready to go: what to send and how to trace it."""

    outbox_id: int
    inbox_id: int
    backend: str
    attempt: int  # 1 for the first try
    # mllp: the raw HL7 message as received; fhir: the transaction Bundle (JSON bytes).
    payload: bytes
    # The control id this delivery carries as MSH-10 (mllp), stable across attempts, so a
    # downstream system can drop a resend of something it already has.
    control_id: str
    # W3C traceparent of the message's ingest span ("" if it was not traced).
    traceparent: str = ""


@dataclass(frozen=True, slots=True)
class Delivered:
    status: str = ""  # e.g. "HTTP 200", "ACK AA"


# Whose failure a `Retry` is, which decides who slows down:
# - "backend": no answer (refused, timed out, dropped), or a failing answer to a message
#   that had not been failing before: evidence the backend is in trouble (the breaker
#   counts it, for the statuses it counts). The outbox sends one row at a time until one
#   is delivered.
# - "message": the backend answered (HTTP 408/429/5xx, ACK AR/CR) a message that has been
#   failing already, or with a status that is no breaker failure: this message's problem
#   until shown otherwise. Only the row waits (its own backoff); the others go on.
# - "unsent": refused before the network (breaker open): not an attempt at all.
Fault = Literal["backend", "message", "unsent"]


@dataclass(frozen=True, slots=True)
class Retry:
    """Not delivered, may succeed later: a 5xx, 408, 429, a timeout, a closed connection,
    an open breaker, an AR... `after`: the backend's Retry-After in seconds, if any."""

    reason: str
    after: float | None = None
    status: str = ""
    fault: Fault = "backend"


@dataclass(frozen=True, slots=True)
class Permanent:
    """Will not succeed by trying again (a 4xx other than 408/429, an AE): dead-letter it
    (it holds its patient's later rows until an operator retries or drops it)."""

    reason: str
    status: str = ""


Verdict = Delivered | Retry | Permanent


class Backend(Protocol):
    """A remote system the outbox delivers to (kind "fhir" or "mllp")."""

    name: str
    kind: str

    async def deliver(self, delivery: Delivery) -> Verdict:
        """One attempt; never raises for a backend problem (that is a verdict)."""
        ...

    def available_in(self) -> float:
        """Seconds until the breaker lets a call through (0: now)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class FhirResponse:
    """A remote FHIR server's answer, as the facade passes it on."""

    status: int
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""


class OutboxGate(Protocol):
    """What the MLLP edge asks of the outbox: room for a message, and a wake-up."""

    def full(self, backends: tuple[str, ...]) -> bool:
        """Whether any of these backends' outboxes is at its cap (answer AR)."""
        ...

    def queued(self, backends: tuple[str, ...]) -> None:
        """A committed message added one row for each of these backends."""
        ...
