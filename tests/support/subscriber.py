"""The subscriber: an aiohttp server on 127.0.0.1 that records what it is sent and answers
what the test tells it to (a status per request, or always)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from gateway.events.signing import verify

SECRET = "synthetic-subscriber-secret-5d1c"
WEBHOOK_SECRET = "synthetic-webhook-secret-9e2b"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def event_id(self) -> str:
        return self.headers.get("X-Isthmus-Event-Id", "")

    def signed_with(self, secret: str) -> bool:
        return verify(secret.encode(), self.body, self.headers.get("X-Isthmus-Signature", ""))


@dataclass
class Subscriber:
    url: str
    received: list[Received] = field(default_factory=list)
    # Statuses for the next requests (then `status`), handshakes included.
    script: list[int] = field(default_factory=list)
    status: int = 200

    @property
    def handshakes(self) -> list[Received]:
        return [r for r in self.received if r.headers.get("X-Isthmus-Event") == "handshake"]

    @property
    def notifications(self) -> list[Received]:
        return [r for r in self.received if r.headers.get("X-Isthmus-Event") != "handshake"]

    def accepted(self) -> list[Received]:
        """Notifications answered 2xx, in order of arrival."""
        return [r for r in self.notifications if r.headers.get("_answered", "") == "200"]


@pytest.fixture
async def subscriber() -> AsyncIterator[Subscriber]:
    state = Subscriber("")

    async def hook(request: web.Request) -> web.Response:
        status = state.script.pop(0) if state.script else state.status
        headers = dict(request.headers)
        headers["_answered"] = str(status)
        state.received.append(Received(headers, await request.read()))
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}/hook"
    yield state
    await runner.cleanup()
