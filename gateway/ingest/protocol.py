"""What the MLLP listener asks of a message handler: one frame in, a future reply out.

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
