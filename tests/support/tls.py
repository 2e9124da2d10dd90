"""A gateway listening for MLLP over TLS, and one-message exchanges with it."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import MllpPeer, RunningGateway, segments, start_gateway
from support.pki import Pki


@contextlib.asynccontextmanager
async def tls_gateway(tmp_path: Path, pki: Pki, **overrides: Any
                      ) -> AsyncIterator[RunningGateway]:
    gw = await start_gateway(tmp_path / "var", **{
        "mllp.tls.enabled": True,
        "mllp.tls.cert_file": pki.server_cert,
        "mllp.tls.key_file": pki.server_key,
        **overrides,
    })
    try:
        yield gw
    finally:
        await gw.runner.cleanup()


def mtls(pki: Pki, **overrides: Any) -> dict[str, Any]:
    return {"mllp.tls.client_ca_file": pki.ca, "mllp.tls.require_client_cert": True,
            **overrides}


async def close(peer: MllpPeer) -> None:
    peer.writer.close()
    with contextlib.suppress(OSError):
        await peer.writer.wait_closed()


async def open_tls(port: int, context: ssl.SSLContext,
                   server_hostname: str | None = None) -> MllpPeer:
    # Bounded: a broken TLS listener must fail the test quickly, not hang it.
    return await asyncio.wait_for(
        MllpPeer.open(port, ssl=context, server_hostname=server_hostname), 5)


async def exchange(port: int, payload: bytes, context: ssl.SSLContext,
                   server_hostname: str | None = None) -> dict[str, list[list[str]]]:
    """One message over a fresh TLS connection; the ACK's segments."""
    peer = await open_tls(port, context, server_hostname)
    try:
        return segments(await peer.request(payload))
    finally:
        await close(peer)


async def refused_exchange(port: int, payload: bytes, **open_kwargs: Any) -> str:
    """Try one message exchange that must fail; how it failed. A hang fails the test."""
    try:
        peer = await asyncio.wait_for(MllpPeer.open(port, **open_kwargs), 5)
    except TimeoutError:
        pytest.fail("the connection attempt hung instead of being refused")
    except OSError as exc:  # ssl.SSLError and ConnectionError are OSErrors
        return f"connect: {type(exc).__name__}: {exc}"
    try:
        await peer.send(payload)
        ack = await peer.reply(timeout=5)
    except TimeoutError:
        pytest.fail("the gateway neither answered nor closed the connection")
    except (OSError, asyncio.IncompleteReadError) as exc:
        return f"exchange: {type(exc).__name__}: {exc}"
    finally:
        await close(peer)
    pytest.fail(f"the exchange completed: {ack!r}")
