"""`isthmus send`: HL7 v2 messages from files over MLLP (optionally TLS), one line per ACK."""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.shared import settings_from

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers

POSITIVE_ACKS = frozenset({"AA", "CA"})


def add_parser(sub: Subparsers) -> None:
    send = sub.add_parser(
        "send", help="send HL7 v2 messages over MLLP and print each ACK",
        description="Defaults come from [send] in the config, then from the gateway's own "
                    "mllp.port and mllp.tls.enabled (ISTHMUS_MLLP__PORT, ...).")
    send.add_argument("files", nargs="+", type=Path, metavar="FILE",
                      help="files holding one or more messages, or a batch")
    send.add_argument("--host", help="default: send.host (127.0.0.1)")
    send.add_argument("--port", type=int, help="default: send.port, else mllp.port (2575)")
    send.add_argument("--timeout", type=float,
                      help="seconds to wait per ACK (default: send.timeout, 10)")
    send.add_argument("--tls", action="store_true", default=None,
                      help="MLLP over TLS (default: send.tls, else mllp.tls.enabled)")
    send.add_argument("--tls-ca", type=Path, help="CA bundle that signed the server")
    send.add_argument("--tls-cert", type=Path, help="client certificate (mTLS)")
    send.add_argument("--tls-key", type=Path, help="client private key (mTLS)")
    send.add_argument("-v", "--verbose", action="store_true",
                      help="print the ERR segments of every ACK (codes and locations)")
    send.set_defaults(run=_send)


@dataclass(frozen=True, slots=True)
class _Target:
    """Where and how to connect, once flags, [send] and the gateway's settings are merged."""

    host: str
    port: int
    timeout: float
    tls: ssl.SSLContext | None
    verbose: bool


def _send(args: argparse.Namespace) -> int:
    from gateway.hl7.batch import split_messages

    messages: list[bytes] = []
    for path in args.files:
        try:
            messages.extend(split_messages(path.read_bytes()))
        except OSError as exc:
            print(f"isthmus send: {path}: {exc.strerror}", file=sys.stderr)
            return 2
    if not messages:
        print("isthmus send: no messages in the given files", file=sys.stderr)
        return 2
    try:
        target = _target(args)
    except _Unusable as exc:
        print(f"isthmus send: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_send_all(target, messages))


class _Unusable(Exception):
    """A flag or setting `isthmus send` cannot work with, said in one line."""


def _target(args: argparse.Namespace) -> _Target:
    settings = settings_from(args, **{
        "send.host": args.host, "send.port": args.port, "send.timeout": args.timeout,
        "send.tls": args.tls, "send.tls_ca": args.tls_ca, "send.tls_cert": args.tls_cert,
        "send.tls_key": args.tls_key,
    })
    send = settings.send
    port = send.port if send.port is not None else settings.mllp.port
    # A CA or client certificate given means TLS, even without --tls.
    implied = send.tls_ca is not None or send.tls_cert is not None
    use_tls = send.tls if send.tls is not None else (implied or settings.mllp.tls.enabled)
    return _Target(send.host, port, send.timeout,
                   _client_tls(send.tls_ca, send.tls_cert, send.tls_key) if use_tls else None,
                   args.verbose)


def _client_tls(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    for label, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not path.is_file():
            raise _Unusable(f"{label} {path}: no such file")
    if key is not None and cert is None:
        raise _Unusable("--tls-key needs --tls-cert")
    try:
        context = ssl.create_default_context(cafile=ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise _Unusable(f"the TLS files are unusable: {exc.reason or exc}") from None
    except OSError as exc:
        raise _Unusable(f"the TLS files are unusable: {exc.strerror or exc}") from None
    return context


async def _send_all(target: _Target, messages: list[bytes]) -> int:
    from gateway.forward.mllp_client import MllpClient

    failures = 0
    client: MllpClient | None = None
    try:
        for raw in messages:
            control_id = _control_id(raw)
            if client is None:
                client = await MllpClient.connect(target.host, target.port,
                                                  timeout=target.timeout,
                                                  ssl_context=target.tls)
            try:
                ack = await client.send(raw)
            except (TimeoutError, ConnectionError) as exc:
                print(f"{control_id} {'timeout' if isinstance(exc, TimeoutError) else 'closed'}")
                failures += 1
                await client.close()
                client = None
                continue
            print(f"{control_id} {ack.code or '?'}")
            if target.verbose:
                for segment in _err_segments(ack.raw):
                    print(f"  {segment}")
            if ack.code not in POSITIVE_ACKS:
                failures += 1
    except (OSError, TimeoutError) as exc:
        print(f"isthmus send: cannot connect to {target.host}:{target.port}: "
              f"{_reason(exc, target)}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            await client.close()
    return 1 if failures else 0


def _reason(exc: BaseException, target: _Target) -> str:
    """Why a connection failed, never empty (TimeoutError and some SSL errors have no text)."""
    if isinstance(exc, TimeoutError):
        if target.tls is not None:  # a plain MLLP port waits for a frame, never answers
            return (f"no answer to the TLS handshake within {target.timeout:g} s; "
                    "is the port TLS?")
        return f"no answer within {target.timeout:g} s"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or type(exc).__name__}); is the port TLS?"
    if isinstance(exc, ConnectionError) and target.tls is not None and not str(exc):
        return "the server closed the connection during the TLS handshake; is the port TLS?"
    return str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc) or \
        type(exc).__name__


def _err_segments(ack: bytes) -> list[str]:
    """The ERR segments of an ACK as text: codes and locations, as the gateway wrote them."""
    text = ack.decode("utf-8", "replace").replace("\n", "\r")
    return [segment for segment in text.split("\r") if segment.startswith("ERR")]


def _control_id(raw: bytes) -> str:
    """MSH-10 for display, read from the MSH line alone ('-' when it cannot be read)."""
    from gateway.hl7.message import salvage_header

    msh = salvage_header(raw)
    if msh is None or not msh.header.control_id:
        return "-"
    return msh.header.control_id
