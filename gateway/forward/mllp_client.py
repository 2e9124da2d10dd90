"""A minimal MLLP client: send a message, wait for its ACK frame, read MSA-1/MSA-2."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from gateway.hl7.errors import Hl7Error
from gateway.hl7.message import parse_message
from gateway.hl7.mllp import FrameDecoder, FrameTooLarge, frame

MAX_ACK_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class AckResult:
    """MSA-1 (acknowledgment code) and MSA-2 (the control id it answers) of a reply."""

    code: str
    control_id: str
    raw: bytes


class MllpClient:
    """One connection; requests go strictly one after another (send, then await the ACK)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._decoder = FrameDecoder(MAX_ACK_BYTES)
        self._frames: list[bytes] = []

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float = 10.0,
                      ssl_context: ssl.SSLContext | None = None) -> MllpClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context, limit=MAX_ACK_BYTES),
            timeout)
        return cls(reader, writer, timeout)

    async def send(self, message: bytes) -> AckResult:
        """Send one message; raises TimeoutError if no ACK arrives in time."""
        self._writer.write(frame(message))
        await self._writer.drain()
        reply = await asyncio.wait_for(self._next_frame(), self._timeout)
        return parse_ack(reply)

    async def _next_frame(self) -> bytes:
        while not self._frames:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("the peer closed the connection before answering")
            for item in self._decoder.feed(data):
                if isinstance(item, FrameTooLarge):
                    raise ConnectionError("the peer answered with an oversize frame")
                self._frames.append(item)
        return self._frames.pop(0)

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def parse_ack(reply: bytes) -> AckResult:
    """MSA-1 and MSA-2 of a reply; code '' when it is not a readable ACK (never a success)."""
    try:
        ack = parse_message(reply)
    except Hl7Error:
        return AckResult("", "", reply)
    return AckResult(ack.get("MSA-1"), ack.get("MSA-2"), reply)
