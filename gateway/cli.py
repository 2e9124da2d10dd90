"""The `isthmus` command line: serve, send, inbox."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, Settings, load_settings

POSITIVE_ACKS = frozenset({"AA", "CA"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        result: int = args.run(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isthmus", description="HL7 v2 <-> FHIR R4 integration gateway")
    parser.add_argument("--config", type=Path, help="TOML config file (or ISTHMUS_CONFIG)")
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway (MLLP and HTTP listeners)")
    serve.add_argument("--host", help="address to listen on (server.host)")
    serve.add_argument("--mllp-port", type=int, help="MLLP port, 0 for any free port")
    serve.add_argument("--http-port", type=int, help="HTTP port, 0 for any free port")
    serve.add_argument("--data-dir", type=Path, help="where the store lives (store.data_dir)")
    serve.set_defaults(run=_serve)

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

    inbox = sub.add_parser("inbox", help="what was received")
    inbox.add_argument("--data-dir", type=Path, help="where the store lives (store.data_dir)")
    inbox_sub = inbox.add_subparsers(metavar="ACTION")
    listing = inbox_sub.add_parser("list", help="recent messages (no PHI shown)")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--status")
    listing.set_defaults(run=_inbox_list)
    show = inbox_sub.add_parser("show", help="one message, with its ACK")
    show.add_argument("id", type=int)
    show.set_defaults(run=_inbox_show)
    return parser


def _settings(args: argparse.Namespace, **flags: Any) -> Settings:
    return load_settings(args.config, overrides=flags)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- serve ------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from gateway.app import serve

    settings = _settings(args, **{
        "server.host": args.host, "mllp.port": args.mllp_port,
        "server.http_port": args.http_port, "store.data_dir": args.data_dir,
    })
    _configure_logging(settings.log.level)
    try:
        return asyncio.run(serve(settings))
    except ssl.SSLError as exc:
        print(f"isthmus: mllp.tls certificate or key is unusable: {exc.reason or exc}",
              file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"isthmus: cannot start: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"isthmus: the store in {settings.store.data_dir} cannot be opened: {exc}",
              file=sys.stderr)
        return 1


# -- send -------------------------------------------------------------------------------


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


# -- inbox ------------------------------------------------------------------------------


def _inbox_db(args: argparse.Namespace) -> Path:
    from gateway.app import INBOX_FILE

    settings = _settings(args, **{"store.data_dir": args.data_dir})
    path = settings.store.data_dir / INBOX_FILE
    if not path.exists():
        raise ConfigError(f"no inbox at {path} (set --data-dir or store.data_dir)")
    return path


def _inbox_list(args: argparse.Namespace) -> int:
    from gateway.store.inbox import read_entries

    entries = asyncio.run(read_entries(_inbox_db(args), args.limit, args.status))
    print(f"{'ID':>8}  {'RECEIVED AT':<27}  {'CONTROL ID':<22}  {'TYPE':<9}  "
          f"{'SENDER':<30}  STATUS")
    for e in entries:
        sender = f"{e.sending_application}/{e.sending_facility}"
        print(f"{e.id:>8}  {e.received_at:<27}  {e.control_id[:22]:<22}  "
              f"{e.message_type:<9}  {sender[:30]:<30}  {e.status}")
    return 0


def _inbox_show(args: argparse.Namespace) -> int:
    from gateway.store.inbox import read_entry

    found = asyncio.run(read_entry(_inbox_db(args), args.id))
    if found is None:
        print(f"isthmus inbox show: no message with id {args.id}", file=sys.stderr)
        return 1
    entry, raw, ack = found
    for name in entry.__slots__:
        print(f"{name}: {getattr(entry, name)}")
    print("message:")
    print(_readable(raw))
    print("ack:")
    print(_readable(ack))
    return 0


def _readable(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
