"""A fake EHR's webhook side: it signs events the way its documentation would tell a
receiver to check them (written here from the recipe in docs/webhooks-in.md, not with the
gateway's code) and posts them, signed or forged, to a gateway's /webhooks/<backend>."""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


def signature(secret: bytes, body: bytes, timestamp: str | None = None) -> str:
    """`sha256=<hex>` of the body, or of `<timestamp>.<body>` when timestamped."""
    signed = body if timestamp is None else timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret, signed, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Sent:
    status: int
    body: Any
    text: str


@dataclass
class WebhookSender:
    """Posts events to one gateway as one backend."""

    gateway_url: str
    backend: str
    secret: bytes
    timestamped: bool = False

    async def send(self, event: Any, *, secret: bytes | None = None,
                   timestamp: float | None = None, raw: bytes | None = None,
                   headers: dict[str, str] | None = None, backend: str | None = None,
                   sign: bool = True) -> Sent:
        body = raw if raw is not None else orjson.dumps(event)
        sent = {"Content-Type": "application/json", **(headers or {})}
        stamp = None
        if self.timestamped:
            stamp = str(int(time.time() if timestamp is None else timestamp))
            sent["X-Timestamp"] = stamp
        if sign:
            sent["X-Signature"] = signature(secret or self.secret, body, stamp)
        async with aiohttp.ClientSession() as session, session.post(
                f"{self.gateway_url}/webhooks/{backend or self.backend}", data=body,
                headers=sent) as answer:
            text = await answer.text()
            try:
                parsed = orjson.loads(text) if text else None
            except orjson.JSONDecodeError:
                parsed = None
            return Sent(answer.status, parsed, text)
