"""Shared fixtures: a real gateway on 127.0.0.1 ephemeral ports with a temp data dir.

`gateway` runs the application in the test's event loop (fast, lets tests look at the
store); `GatewayProcess` runs `python -m gateway serve` as a child process (signals,
crashes, the listening line).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web

from gateway.config import Settings, load_settings
from gateway.hl7.mllp import FrameDecoder, FrameTooLarge, frame
from support.backends import store_backend  # noqa: F401 - fixtures for every suite
from support.builders import with_fields
from support.pki import pki  # noqa: F401 - the session's throwaway PKI, a fixture for every suite
from support.postgres import header_line as _postgres_header
from support.postgres import pg_pool, pg_spec  # noqa: F401
from support.subscriber import subscriber  # noqa: F401 - the events tests' receiver

if TYPE_CHECKING:
    from gateway.store.inbox_sqlite import SqliteInbox
    from gateway.telemetry import Telemetry

MESSAGES = Path(__file__).parent / "messages"


def pytest_report_header() -> str:
    """One line saying whether the PostgreSQL half of the store tests runs."""
    return _postgres_header()


def _reference_corpus() -> Path:
    """The shared HL7 corpus: $ISTHMUS_REFERENCE_MESSAGES, ../shared next to the checkout,
    or the workplace's /work/shared (a clone elsewhere still finds it)."""
    candidates = [
        Path(os.environ.get("ISTHMUS_REFERENCE_MESSAGES", "/nonexistent")),
        Path(__file__).resolve().parents[2] / "shared" / "reference" / "messages",
        Path("/work/shared/reference/messages"),
    ]
    return next((c for c in candidates if c.is_dir()), candidates[1])


REFERENCE = _reference_corpus()
LISTENING = re.compile(r"^isthmus listening mllp=(?P<mh>[^:]+):(?P<mp>\d+) "
                       r"http=(?P<hh>[^:]+):(?P<hp>\d+)$")


def message(name: str) -> bytes:
    return (MESSAGES / name).read_bytes()


def with_control_id(raw: bytes, control_id: str) -> bytes:
    """A copy of a message with MSH-10 replaced."""
    return with_fields(raw, "MSH", {10: control_id})


@dataclass
class RunningGateway:
    app: web.Application
    runner: web.AppRunner
    data_dir: Path
    mllp_port: int
    http_url: str

    @property
    def inbox(self) -> SqliteInbox:
        from gateway.edge.http import INBOX

        return self.app[INBOX]

    @property
    def mllp(self) -> Any:
        from gateway.app.state import MLLP

        return self.app[MLLP]


async def start_gateway(data_dir: Path, telemetry: Telemetry | None = None,
                        **overrides: Any) -> RunningGateway:
    # Imported here so codec-only test modules do not depend on the whole app importing.
    from gateway.app.server import build_app
    from gateway.app.state import MLLP_ADDRESS
    from gateway.edge.http_server import GatewayRunner

    values = {"server.host": "127.0.0.1", "mllp.port": 0, "server.http_port": 0,
              "store.data_dir": data_dir, "store.synchronous": "normal",
              # In the test's process: apply there too (the worker processes have their
              # own tests, which ask for them).
              "processes.workers": 0, **overrides}
    settings = load_settings(None, environ={}, overrides=values)
    app = build_app(settings, telemetry)
    runner = GatewayRunner(app, handle_signals=False)  # as `isthmus serve` runs it
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
    except BaseException:
        await runner.cleanup()  # closes the resources that opened before the failure
        raise
    http_port = runner.addresses[0][1]
    _, mllp_port = app[MLLP_ADDRESS]
    return RunningGateway(app, runner, data_dir, mllp_port, f"http://127.0.0.1:{http_port}")


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    running = await start_gateway(tmp_path / "var")
    yield running
    await running.runner.cleanup()


class MllpPeer:
    """A test-side MLLP connection that can send raw bytes and read framed replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(10 * 1024 * 1024)
        self.frames: list[bytes] = []

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", **kwargs: Any) -> MllpPeer:
        reader, writer = await asyncio.open_connection(host, port, **kwargs)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, payload: bytes) -> None:
        await self.send_raw(frame(payload))

    async def reply(self, timeout: float = 5.0) -> bytes:
        async def next_frame() -> bytes:
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("closed by the gateway")
                for item in self.decoder.feed(data):
                    assert not isinstance(item, FrameTooLarge)
                    self.frames.append(item)
            return self.frames.pop(0)

        return await asyncio.wait_for(next_frame(), timeout)

    async def request(self, payload: bytes, timeout: float = 5.0) -> bytes:
        await self.send(payload)
        return await self.reply(timeout)

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def segments(ack: bytes, encoding: str = "utf-8") -> dict[str, list[list[str]]]:
    """ACK segments by id, each as its list of fields (MSH numbered like the standard)."""
    out: dict[str, list[list[str]]] = {}
    text = ack.decode(encoding)
    separator = text[3] if text.startswith("MSH") and len(text) > 3 else "|"
    for seg in text.split("\r"):
        if not seg:
            continue
        fields = seg.split(separator)
        if seg.startswith("MSH"):
            fields.insert(1, separator)
        out.setdefault(seg[:3], []).append(fields)
    return out


@dataclass
class GatewayProcess:
    """`python -m gateway serve` in a child process, on ephemeral ports."""

    data_dir: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    mllp_port: int = 0
    http_port: int = 0
    listening_line: str = ""

    def start(self, timeout: float = 20.0) -> GatewayProcess:
        log = (self.data_dir.parent / "gateway-stderr.log").open("a")
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
             "--mllp-port", "0", "--http-port", "0", "--data-dir", str(self.data_dir),
             *self.extra_args],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline().rstrip("\n")
        if time.monotonic() > deadline or not line:
            self.kill()
            raise RuntimeError("gateway did not print its listening line")
        match = LISTENING.match(line)
        assert match, f"unexpected first line: {line!r}"
        self.listening_line = line
        self.mllp_port = int(match["mp"])
        self.http_port = int(match["hp"])
        return self

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def remaining_stdout(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        return self.proc.stdout.read()


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path / "var")
    yield process
    process.kill()


def default_settings() -> Settings:
    return load_settings(None, environ={})
