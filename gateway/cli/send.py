"""`isthmus send`: HL7 v2 messages from files over MLLP (optionally TLS), one line per ACK."""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers

POSITIVE_ACKS = frozenset({"AA", "CA"})


def add_parser(sub: Subparsers) -> None:
    send = sub.add_parser("send", help="send HL7 v2 messages over MLLP and print each ACK")
    send.add_argument("files", nargs="+", type=Path, metavar="FILE",
                      help="files holding one or more messages, or a batch")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=2575)
    send.add_argument("--timeout", type=float, default=10.0, help="seconds to wait per ACK")
    send.add_argument("--tls", action="store_true", help="MLLP over TLS")
    send.add_argument("--tls-ca", type=Path, help="CA bundle that signed the server")
    send.add_argument("--tls-cert", type=Path, help="client certificate (mTLS)")
    send.add_argument("--tls-key", type=Path, help="client private key (mTLS)")
    send.set_defaults(run=_send)


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
    context = _client_tls(args) if args.tls else None
    return asyncio.run(_send_all(args.host, args.port, args.timeout, context, messages))


def _client_tls(args: argparse.Namespace) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=args.tls_ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if args.tls_cert:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


async def _send_all(host: str, port: int, timeout: float, context: ssl.SSLContext | None,
                    messages: list[bytes]) -> int:
    from gateway.forward.mllp_client import MllpClient

    failures = 0
    client: MllpClient | None = None
    try:
        for raw in messages:
            control_id = _control_id(raw)
            if client is None:
                client = await MllpClient.connect(host, port, timeout=timeout,
                                                  ssl_context=context)
            try:
                ack = await client.send(raw)
            except (TimeoutError, ConnectionError) as exc:
                print(f"{control_id} {'timeout' if isinstance(exc, TimeoutError) else 'closed'}")
                failures += 1
                await client.close()
                client = None
                continue
            print(f"{control_id} {ack.code or '?'}")
            if ack.code not in POSITIVE_ACKS:
                failures += 1
    except (OSError, TimeoutError) as exc:
        print(f"isthmus send: cannot connect to {host}:{port}: {exc}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            await client.close()
    return 1 if failures else 0


def _control_id(raw: bytes) -> str:
    """MSH-10 for display, read from the MSH line alone ('-' when it cannot be read)."""
    from gateway.hl7.message import salvage_header

    msh = salvage_header(raw)
    if msh is None or not msh.header.control_id:
        return "-"
    return msh.header.control_id
