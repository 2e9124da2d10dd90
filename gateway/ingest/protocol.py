"""What the MLLP listener asks of a message handler: one frame in, a future reply out;
and the memory budget the two share.

The edge depends on this protocol, not on the handler that implements it (as Google's
MLLP adapter's receiver depends on a `sender` interface), so it imports nothing else of
ingest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.hl7.message import Header
from gateway.hl7.mllp import FrameTooLarge

# The bytes to send back for a frame; None: send nothing (enhanced mode, no accept ACK).
Reply = bytes | None
# Sends an unsolicited frame on the connection a message came in on (if still open).
Push = Callable[[bytes], None]


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection: address and, with mTLS, the subject."""

    address: str
    tls_subject: str | None = None


# Decides whether a (verified) certificate subject may send as this MSH-3/MSH-4.
SenderCheck = Callable[[Peer, Header], bool]


class FrameHandler(Protocol):
    """Handles one MLLP frame (or the notice that one was too large)."""

    def handle(self, frame: bytes | FrameTooLarge, peer: Peer,
               push: Push | None = None) -> asyncio.Future[Reply]:
        """Start handling a frame; the future resolves to the bytes to send back.

        `push` sends a later, unsolicited message on the same connection (the enhanced
        mode application ACK)."""
        ...


# A frame counts twice against the budget once it is whole, until its ACK: at every stage
# from then on a second copy of it exists for a while (the bytes made of the receive
# buffer beside the buffer; the pickled copy on its way to the large-frame process or a
# worker; SQLite's copy of the bound blob while its commit runs). A large frame's
# compressed form (store/raw_form.py, ~a tenth of it) comes back from the large-frame
# process and is what SQLite copies and a sealed data dir encrypts, so the second copy
# still covers it; for a small frame a sealed data dir adds a third during the commit
# (the ciphertext), which the budget does not count.
FRAME_COPIES = 2


def frame_charge(length: int) -> int:
    """What a whole frame of `length` bytes counts against the budget."""
    return FRAME_COPIES * length


class Budget:
    """Bytes of MLLP frames the edge holds between receipt and commit, across every
    connection (`processes.memory_budget_bytes`): the listener's unfinished frames, as they
    are read (`receive`), and the handler's whole ones (`take`, `frame_charge`).

    A whole frame that would cross the limit is refused (AR "resend later"). The listener
    stops reading every connection while the budget is `full` and whole frames will give
    bytes back without more reading (`draining`); while only unfinished frames hold it, it
    drops the frame whose read crossed the line instead (AR), since waiting would free
    nothing."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most ever held (for /metrics and the test that pins the bound)
        self.refused = 0
        # Of `held`, the bytes of frames still being received.
        self.receiving = 0
        # Room kept free for one more read of a socket (set by the listener): `full` once
        # the next read could cross the limit.
        self.headroom = 0
        # Called when bytes are given back and the budget has room again, or only
        # unfinished frames still fill it (waiting would free nothing): the listener reads
        # again (and drops the frame whose read crosses the line).
        self.on_room: Callable[[], None] | None = None

    @property
    def full(self) -> bool:
        return self.held + self.headroom > self.limit

    @property
    def draining(self) -> bool:
        """Whole frames are held: their ACKs give bytes back without reading more."""
        return self.held > self.receiving

    def take(self, size: int) -> bool:
        """Hold `size` bytes, or refuse (False) if that would cross the limit."""
        if self.held + size > self.limit:
            self.refused += 1
            return False
        self._add(size)
        return True

    def give_back(self, size: int) -> None:
        self._add(-min(size, self.held))

    def receive(self, change: int) -> None:
        """Unfinished frames grew (bytes read, already in memory: never refused) or were
        let go of (finished, dropped, their connection closed)."""
        change = max(change, -self.receiving)
        self.receiving += change
        self._add(change)

    def _add(self, change: int) -> None:
        was_full = self.full
        self.held += change
        if change > 0:
            self.peak = max(self.peak, self.held)
            return
        if self.on_room is not None and (was_full and not self.full
                                         or self.full and not self.draining):
            self.on_room()
