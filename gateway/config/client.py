"""Settings of `isthmus send`, the MLLP client: where it connects and how it trusts the server.

Unset values fall back to the gateway's own settings on the same host (mllp.port,
mllp.tls.enabled), so `isthmus send` reaches the gateway that the same config runs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from gateway.config.base import Section as _Section


class SendConfig(_Section):
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=1, le=65535)  # None: mllp.port
    tls: bool | None = None  # None: mllp.tls.enabled
    tls_ca: Path | None = None  # the CA that signed the server; None: the system store
    tls_cert: Path | None = None  # a client certificate, for mTLS
    tls_key: Path | None = None
    timeout: float = Field(default=10.0, gt=0)  # seconds to wait for each ACK
