"""The inbox's interface: what ingest, the applier and replay ask of it, and its rows.

Every accepted inbound message is committed to the inbox before it is acknowledged.
`gateway.store.inbox_sqlite` implements it on SQLite; the same protocol is what another
database implements (the PostgreSQL issue).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

# Inbox statuses: stored only (translation off), translated (not yet in the FHIR store),
# applied to the FHIR store, could not be translated or applied, or of a message type no
# table maps. `failed` and `unsupported` can be replayed; `translated` rows are applied by
# the running gateway (at start-up too, so a crash between commit and apply loses nothing).
ACCEPTED = "accepted"
TRANSLATED = "translated"
# Translated, and routed to remote backends only (the outbox delivers it; not for the
# local store).
ROUTED = "routed"
APPLIED = "applied"
FAILED = "failed"
UNSUPPORTED = "unsupported"
# Translated, but its record's identifier is held by two records in the FHIR store: it
# waits for them to be merged (`isthmus fhir merge`), then `isthmus inbox replay --failed`.
IDENTITY_CONFLICT = "identity-conflict"
REPLAYABLE = (FAILED, UNSUPPORTED, IDENTITY_CONFLICT)
# A different message under a control id this sender used within the duplicate window:
# kept, not processed, answered AE/CE. An operator reviews it and replays it by id (never
# with --failed: accepting it is a decision).
CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """What the edge hands the inbox: identity, routing facts and the raw bytes."""

    sending_application: str
    sending_facility: str
    control_id: str
    message_type: str
    version: str
    peer: str
    raw: bytes
    ack: bytes
    received_at: datetime
    status: str = ACCEPTED
    error: str = ""
    # Remote backends this message must be delivered to (the outbox rows the trigger makes).
    routes: tuple[str, ...] = ()
    # Orders deliveries per patient: a hash of the patient identifier, "" if none.
    patient_key: str = ""
    # The W3C traceparent of the ingest span, for the delivery spans.
    trace: str = ""
    # The translated transaction Bundle (JSON), kept when a FHIR backend is routed.
    bundle: bytes | None = None
    # gateway.hl7.message.content_digest: tells a resend from another message under the
    # same dedup key. "": not compared (a duplicate key is a duplicate, as before).
    content_hash: str = ""
    # Builds the ACK for a control id conflict; called only when there is one (it is rare,
    # and the hot path should not build two ACKs per message).
    conflict_ack: Callable[[], bytes] | None = None
    # `raw` compressed (store/raw_form.py `packed`), made by the large-frame process: a
    # SQLite inbox stores this in place of `raw`. None: `raw` is stored as it is.
    packed: bytes | None = None

    @property
    def stored_raw(self) -> bytes:
        """What the inbox's `raw` column holds (before sealing)."""
        return self.packed if self.packed is not None else self.raw

    @property
    def dedup_key(self) -> str:
        # Unit separators cannot occur in HL7 text, so the three parts never run together.
        return f"{self.sending_application}\x1f{self.sending_facility}\x1f{self.control_id}"


@dataclass(frozen=True, slots=True)
class Stored:
    """The outcome of accepting one message: its inbox id and the ACK to send."""

    inbox_id: int
    ack: bytes
    duplicate: bool
    # Stored as a CONFLICT (its control id was used for another message); `ack` answers it.
    conflict: bool = False


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """One inbox row as listed to operators: no PHI (no raw message, no patient data)."""

    id: int
    received_at: str
    sending_application: str
    sending_facility: str
    control_id: str
    message_type: str
    version: str
    peer: str
    size: int
    status: str
    error: str = ""



@dataclass(frozen=True, slots=True)
class Replayed:
    """A replay's outcome for one row, and what it now owes remote backends: the Bundle
    for the FHIR backends its route names (they could not take it untranslated)."""

    inbox_id: int
    status: str
    error: str = ""
    routes: tuple[str, ...] = ()
    patient_key: str = ""
    bundle: bytes | None = None


# (inbox id, raw message, received at) of stored rows, oldest first.
RawRows = list[tuple[int, bytes, datetime]]


class Inbox(Protocol):
    """The durable inbox as the MLLP pipeline uses it: commit, read back, mark outcomes."""

    def submit(self, message: InboundMessage) -> asyncio.Future[Stored]:
        """Queue a message for the next commit; the future resolves once it is durable
        (StoreUnavailable if it could not be), with the original's ACK for a duplicate.

        A message under a used dedup key whose `content_hash` differs from the stored one
        is not a duplicate: it is stored as a CONFLICT row (no dedup key, no deliveries)
        with the ACK `conflict_ack` builds, and resolves with `conflict=True`."""
        ...

    async def get(self, inbox_id: int) -> tuple[InboxEntry, bytes, bytes] | None:
        """One row: its listing, raw message and stored ACK; None if there is none."""
        ...

    async def with_status(self, status: str, limit: int = 500, after: int = 0) -> RawRows:
        """(id, raw, received at) of the oldest rows in one status, after an id."""
        ...

    async def set_statuses(self, outcomes: Sequence[tuple[int, str, str]]) -> None:
        """Set (id, status, error) for several rows."""
        ...


class RunningInbox(Inbox, Protocol):
    """The inbox as the running gateway holds it (readiness, housekeeping, shutdown):
    `SqliteInbox`, or PostgreSQL's shared by several instances (gateway.store.pg.inbox)."""

    async def probe_writable(self) -> None:
        """A real (tiny) write; StoreUnavailable if it fails."""
        ...

    async def expire_dedup_keys(self) -> int:
        """Release the duplicate keys older than the window; how many."""
        ...

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        ...


class ApplyTurns(Protocol):
    """One patient's rows applied in inbox order when several instances apply one inbox
    (PostgreSQL: gateway.store.pg.turns); a single applier needs none."""

    def turn(self, inbox_id: int) -> AbstractAsyncContextManager[list[int]]:
        """Hold the turn of the row's patient to apply (an apply of another row of theirs,
        on any instance, waits until it ends); gives the patient's rows up to this one
        still `translated`, oldest first: this one last, or absent if it was applied (or
        refused) meanwhile. A row without a patient is its own turn."""
        ...

    async def close(self) -> None:
        ...
