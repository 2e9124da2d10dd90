"""A fake downstream MLLP system on 127.0.0.1: acknowledges, refuses, garbles, answers
late or not at all, drops the connection, goes down and comes back on the same port.

Each received message is recorded (MSH-10 and bytes) in arrival order, whatever the
answer. Modes: AA, CA, AE, CE, AR, CR (that ACK), "malformed" (a frame that is no ACK),
"wrong-id" (an AA for another control id), "stale-first" (an AA for another id, then this
one's), "late" (the AA after `late_delay`), "drop" (close without answering), "silent"
(never answer). How a message is answered: its control id's mode if one is set (`by_id`), else
the next scripted mode (`script`), else the default.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from dataclasses import dataclass, field

from gateway.hl7.mllp import FrameDecoder, FrameTooLarge, frame
from support.builders import hl7

MODES = ("AA", "CA", "AE", "CE", "AR", "CR", "malformed", "wrong-id", "late", "drop",
         "silent", "stale-first")


@dataclass(frozen=True)
class Received:
    control_id: str
    raw: bytes
    received_at: float = field(default_factory=time.monotonic)  # for latency measurements


def control_id_of(raw: bytes) -> str:
    """MSH-10 read from the MSH line alone (the field separator is its 4th byte)."""
    line = raw.split(b"\r", 1)[0].split(b"\n", 1)[0]
    fields = line.split(line[3:4]) if len(line) > 3 else []
    return fields[9].decode() if len(fields) > 9 else ""


def ack(code: str, control_id: str, *, error: bool = False) -> bytes:
    segments = [f"MSH|^~\\&|DOWNSTREAM|FAC|ISTHMUS|GW|20260101000000||ACK|A{control_id[-8:]}"
                f"|P|2.5.1", f"MSA|{code}|{control_id}"]
    if error:
        # ERR-3 code, ERR-4 severity, ERR-8 a user message: only the codes may be repeated.
        segments.append("ERR|||207^Application internal error^HL70357|E||||SECRET TEXT")
    return hl7(*segments)


@dataclass
class FakeMllp:
    default: str = "AA"
    late_delay: float = 0.5
    host: str = "127.0.0.1"
    port: int = 0
    by_id: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    late_written: int = 0  # "late" answers written so far (the test can wait for one)
    _script: deque[str] = field(default_factory=deque)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    ssl_context: ssl.SSLContext | None = None  # MLLP over TLS (and mTLS if it asks)

    def script(self, *modes: str) -> None:
        """The next messages are answered in these modes, in order."""
        assert all(m in MODES for m in modes)
        self._script.extend(modes)

    @property
    def control_ids(self) -> list[str]:
        return [r.control_id for r in self.received]

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> FakeMllp:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and close every open connection (the system goes down)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def __aenter__(self) -> FakeMllp:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _mode_for(self, control_id: str) -> str:
        if control_id in self.by_id:
            return self.by_id[control_id]
        return self._script.popleft() if self._script else self.default

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        decoder = FrameDecoder(10 * 1024 * 1024)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for item in decoder.feed(data):
                    assert not isinstance(item, FrameTooLarge)
                    if not await self._answer(item, writer):
                        return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(self, raw: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one message; False when the connection is to be closed."""
        control_id = control_id_of(raw)
        self.received.append(Received(control_id, raw))
        mode = self._mode_for(control_id)
        if mode == "drop":
            return False
        if mode == "silent":
            return True
        if mode == "late":
            await asyncio.sleep(self.late_delay)
            reply = ack("AA", control_id)
        elif mode == "malformed":
            reply = b"this is not an acknowledgement"
        elif mode == "wrong-id":
            reply = ack("AA", "SOMEONE-ELSES-ID")
        elif mode == "stale-first":
            # An ACK for an earlier message arrives first, then this message's own.
            writer.write(frame(ack("AA", "AN-EARLIER-ID")))
            reply = ack("AA", control_id)
        else:
            reply = ack(mode, control_id, error=mode in ("AE", "CE"))
        writer.write(frame(reply))
        if mode == "late":
            self.late_written += 1
        await writer.drain()
        return True
