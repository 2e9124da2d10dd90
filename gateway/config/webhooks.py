"""Settings of the webhooks a backend sends the gateway (`webhook = {...}` on a backend)."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, model_validator

from gateway.config.base import Section as _Section

# RFC 6901 JSON pointer: "" is the whole document, which names no event id or resource.
_POINTER = re.compile(r"(/([^~/]|~[01])*)+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_HEADER = r"^[A-Za-z0-9-]{1,64}$"


def is_pointer(text: str) -> bool:
    """A JSON pointer (RFC 6901) into the event, not the empty one."""
    return bool(_POINTER.fullmatch(text))


class InboundWebhookConfig(_Section):
    """How a backend's change notifications are checked and read.

    `event_id` and `resource` are JSON pointers into the event; `resource` may instead be
    a URL template whose `{/pointer}` parts are filled from the event
    (`Appointment/{/data/appointment_id}`). `shape` names a table under
    mappings/webhooks/ whose rows give both per kind of event (then the two keys may be
    left out; when given they apply to events no row matches)."""

    secret_env: str
    # hmac-sha256: HMAC-SHA256 of the body, hex or base64, optionally "sha256=..."
    # hmac-sha256-timestamp: of "<timestamp>.<body>", the Unix timestamp in its own header,
    # refused outside `tolerance` seconds of now (a captured event cannot be replayed).
    signature: Literal["hmac-sha256", "hmac-sha256-timestamp"] = "hmac-sha256"
    signature_header: str = Field(default="X-Signature", pattern=_HEADER)
    timestamp_header: str = Field(default="X-Timestamp", pattern=_HEADER)
    tolerance: float = Field(default=300.0, gt=0, le=86_400)
    event_id: str = ""
    resource: str = ""
    shape: str = Field(default="", pattern=r"^[a-z0-9_-]{0,32}$")
    # The largest event accepted (413 beyond it).
    max_body_bytes: int = Field(default=262_144, ge=256, le=16_777_216)
    # Fetches of one event: attempts before it is listed `failed`, and the longest wait
    # between two (full-jitter backoff from 1 s).
    max_attempts: int = Field(default=50, ge=1, le=10_000)
    retry_max_delay: float = Field(default=300.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _readable(self) -> InboundWebhookConfig:
        if not _ENV_NAME.fullmatch(self.secret_env):
            raise ValueError("webhook: secret_env is the name of an environment variable")
        if not self.shape and not (self.event_id and self.resource):
            raise ValueError("webhook: event_id and resource are needed (or a shape)")
        if self.event_id and not is_pointer(self.event_id):
            raise ValueError("webhook: event_id is a JSON pointer such as /id")
        if self.resource and not (is_pointer(self.resource) or "{" in self.resource):
            raise ValueError("webhook: resource is a JSON pointer or a URL template with "
                             "{/pointer} parts")
        return self

    def secret(self) -> bytes:
        """The shared secret, from the environment (read here: config reads os.environ)."""
        value = os.environ.get(self.secret_env, "")
        if not value:
            raise ValueError(f"webhook: environment variable {self.secret_env} is not set")
        return value.encode("utf-8")
