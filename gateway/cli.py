"""The `isthmus` command line: serve, send, inbox, translate, mappings, audit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
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
    replay = inbox_sub.add_parser(
        "replay", help="translate stored messages again (after a table is fixed)")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?", help="one inbox id")
    which.add_argument("--failed", action="store_true",
                       help="every message that failed or had no table")
    replay.set_defaults(run=_inbox_replay)

    translate = sub.add_parser(
        "translate", help="HL7 v2 to FHIR R4 Bundles, or FHIR R4 to HL7 v2, on stdout")
    translate.add_argument("file", nargs="?", default="-", metavar="FILE|-",
                           help="input file; '-' or nothing reads stdin")
    translate.add_argument("--to", choices=("fhir", "hl7"),
                           help="output format (default: the other one than the input)")
    translate.add_argument("--pretty", action="store_true", help="indented JSON")
    translate.add_argument("--event", help="v2 event for FHIR input, e.g. A28 or S14")
    translate.set_defaults(run=_translate)

    mappings = sub.add_parser("mappings", help="the mapping tables")
    mappings_sub = mappings.add_subparsers(metavar="ACTION")
    check = mappings_sub.add_parser(
        "check", help="check the tables (and a site's overrides) as a start-up would")
    check.add_argument("dir", nargs="?", type=Path, metavar="DIR",
                       help="a site directory overriding the shipped tables")
    check.add_argument("--tables", type=Path, help="check this table set instead of the shipped")
    check.set_defaults(run=_mappings_check)
    _audit_parser(sub)
    _outbox_parser(sub)
    auth = sub.add_parser("auth", help="credentials for the FHIR API")
    auth_sub = auth.add_subparsers(metavar="ACTION")
    api_key = auth_sub.add_parser(
        "api-key", help="make a new API key; prints it once, and the config lines to add")
    api_key.add_argument("name", help="a name for the key (letters, digits, . _ @ -)")
    api_key.add_argument("--scope", action="append", default=[], metavar="SCOPE",
                         help="a SMART scope to grant, e.g. 'system/Patient.rs' (repeat)")
    api_key.add_argument("--profile", help="a minimum-necessary profile from [profiles]")
    api_key.set_defaults(run=_auth_api_key)
    return parser


def _settings(args: argparse.Namespace, **flags: Any) -> Settings:
    return load_settings(args.config, overrides=flags)


def _configure_logging(level: str) -> None:
    from gateway.policy.redact import install

    logging.basicConfig(
        stream=sys.stderr, level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every line that leaves the process goes through the PHI filter, whatever logs it.
    install()


# -- serve ------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from gateway.app import serve
    from gateway.audit import AuditIntegrityError, AuditKeyError
    from gateway.mapping.errors import TableError, TableErrors

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
    except (TableErrors, TableError) as exc:
        print(f"isthmus: the mapping tables are not usable:\n{exc}", file=sys.stderr)
        return 2
    except (AuditKeyError, AuditIntegrityError) as exc:
        print(f"isthmus: the audit trail cannot be opened: {exc}", file=sys.stderr)
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
    refused = _record_accesses(args, [_message_access("read", args.id, raw, entry.control_id)])
    if refused is not None:
        print(f"isthmus inbox show: {refused}; the message is not shown", file=sys.stderr)
        return 1
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


# -- inbox replay -----------------------------------------------------------------------


def _inbox_replay(args: argparse.Namespace) -> int:
    from gateway.app import build_router, load_translator
    from gateway.store.inbox import read_raw, record_outcomes

    settings = _settings(args, **{"store.data_dir": args.data_dir})
    path = _inbox_db(args)
    translator = _tables_or_exit(lambda: load_translator(settings))
    if translator is None:
        return 2
    rows = asyncio.run(read_raw(path, None if args.failed else [args.id]))
    if not rows and not args.failed:
        print(f"isthmus inbox replay: no message with id {args.id}", file=sys.stderr)
        return 1
    router = build_router(settings) if settings.routes else None
    outcomes = [_replay_one(translator, router, row_id, raw, received)
                for row_id, raw, received in rows]
    refused = _record_accesses(args, [
        _message_access("translate", row_id, raw, outcome=outcome.status)
        for (row_id, raw, _), outcome in zip(rows, outcomes, strict=True)])
    if refused is not None:
        print(f"isthmus inbox replay: {refused}; nothing was replayed", file=sys.stderr)
        return 1
    asyncio.run(record_outcomes(path, outcomes))
    for outcome in outcomes:
        routed = f" -> {', '.join(outcome.routes)}" if outcome.routes else ""
        print(f"{outcome.inbox_id} {outcome.status}"
              + (f" {outcome.error}" if outcome.error else "") + routed)
    return 0 if all(o.status in ("translated", "routed") for o in outcomes) else 1


def _replay_one(translator: Any, router: Any, inbox_id: int, raw: bytes,
                received: Any) -> Any:
    """Translate a stored message again (as received); where its route now sends it: the
    local store (status translated, applied by the gateway's sweep) and the FHIR backends
    that could not take it untranslated (their Bundle and outbox rows)."""
    from gateway.edge.ingest import patient_key
    from gateway.fhir.bundle import dumps, to_bundle
    from gateway.hl7.errors import Hl7Error
    from gateway.hl7.message import parse_message
    from gateway.mapping.errors import TranslationError, UnsupportedMessage
    from gateway.store.inbox import ROUTED, TRANSLATED, Replayed

    try:
        message = parse_message(raw)
        translation = translator.translate(message, received)
    except UnsupportedMessage as exc:
        return Replayed(inbox_id, "unsupported", exc.safe_text)
    except TranslationError as exc:
        return Replayed(inbox_id, "failed", exc.safe_text)
    except Hl7Error as exc:
        return Replayed(inbox_id, "failed", exc.reason)
    if router is None:
        return Replayed(inbox_id, TRANSLATED)
    header = message.header
    targets = router.for_message(header.message_type, header.sending_application,
                                 header.sending_facility)
    owed = tuple(n for n in targets.remote
                 if n not in router.untranslated(targets).remote)
    return Replayed(inbox_id, TRANSLATED if targets.local else ROUTED, routes=owed,
                    patient_key=patient_key(message) if owed else "",
                    bundle=dumps(to_bundle(translation)) if owed else None)


def _tables_or_exit(load: Any) -> Any:
    """Whatever `load` builds from the tables, or None after saying which are unusable."""
    from gateway.mapping.errors import TableError, TableErrors

    try:
        return load()
    except (TableErrors, TableError) as exc:
        print(f"isthmus: the mapping tables are not usable:\n{exc}", file=sys.stderr)
        return None


# -- outbox -----------------------------------------------------------------------------


# gateway.store.outbox.STATUSES, spelled out so that building the parser imports no store.
_OUTBOX_STATUSES = ("pending", "delivered", "dead", "dropped")


def _outbox_parser(sub: Any) -> None:
    outbox = sub.add_parser("outbox", help="deliveries to remote backends: see, retry, drop")
    outbox.add_argument("--data-dir", type=Path, help="where the store lives (store.data_dir)")
    actions = outbox.add_subparsers(metavar="ACTION")
    listing = actions.add_parser("list", help="recent deliveries, newest first (no PHI shown)")
    listing.add_argument("--status", choices=_OUTBOX_STATUSES)
    listing.add_argument("--backend", metavar="NAME")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(run=_outbox_list)
    show = actions.add_parser("show", help="one delivery: statuses and times (not the message)")
    show.add_argument("id", type=int)
    show.set_defaults(run=_outbox_show)
    retry = actions.add_parser(
        "retry", help="deliver dead (or dropped) rows again, with a fresh attempt budget")
    retry.add_argument("ids", type=int, nargs="*", metavar="ID")
    retry.add_argument("--all-dead", action="store_true", help="every dead row")
    retry.add_argument("--backend", metavar="NAME", help="only rows for this backend")
    retry.set_defaults(run=_outbox_retry, usage=retry.format_usage())
    drop = actions.add_parser("drop", help="set rows aside for good (kept, never delivered)")
    drop.add_argument("ids", type=int, nargs="+", metavar="ID")
    drop.set_defaults(run=_outbox_drop)


def _outbox_run(args: argparse.Namespace, action: Any) -> tuple[bool, Any]:
    """(True, `action(outbox)`) on the outbox beside a (possibly running) gateway, or
    (False, None) after saying why the outbox cannot be used."""
    from gateway.store import StoreUnavailable
    from gateway.store.outbox import open_outbox

    path = _inbox_db(args)

    async def run() -> Any:
        async with open_outbox(path) as outbox:
            return await action(outbox)

    try:
        return True, asyncio.run(run())
    except (StoreUnavailable, sqlite3.Error) as exc:
        reason = exc if isinstance(exc, StoreUnavailable) else type(exc).__name__
        print(f"isthmus outbox: the outbox cannot be used ({reason})", file=sys.stderr)
        return False, None


def _outbox_list(args: argparse.Namespace) -> int:
    ok, entries = _outbox_run(args, lambda o: o.list_entries(args.status, args.backend,
                                                            args.limit))
    if not ok:
        return 1
    print(f"{'ID':>8}  {'INBOX':>8}  {'BACKEND':<12}  {'STATUS':<9}  {'TRIES':>5}  "
          f"{'TYPE':<9}  {'CONTROL ID':<22}  {'LAST STATUS':<18}  {'ERROR':<40}  UPDATED")
    for e in entries:
        print(f"{e.id:>8}  {e.inbox_id:>8}  {e.backend[:12]:<12}  {e.status:<9}  "
              f"{e.attempts:>5}  {e.message_type[:9]:<9}  {e.control_id[:22]:<22}  "
              f"{e.last_status[:18] or '-':<18}  {e.error[:40] or '-':<40}  {e.updated_at}")
    return 0


def _outbox_show(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from gateway.forward.outbox import control_id_for

    ok, entry = _outbox_run(args, lambda o: o.get(args.id))
    if not ok:
        return 1
    if entry is None:
        print(f"isthmus outbox show: no delivery with id {args.id}", file=sys.stderr)
        return 1
    if entry.status != "pending":
        next_attempt = "-"
    elif entry.next_at <= datetime.now(UTC).timestamp():
        next_attempt = "now"
    else:
        next_attempt = datetime.fromtimestamp(entry.next_at, UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
    for name, value in (
            ("id", entry.id), ("inbox id", entry.inbox_id), ("backend", entry.backend),
            ("status", entry.status), ("attempts", entry.attempts),
            ("message type", entry.message_type), ("control id", entry.control_id),
            ("sent as", control_id_for(entry.id)), ("last status", entry.last_status or "-"),
            ("error", entry.error or "-"), ("created", entry.created_at),
            ("updated", entry.updated_at), ("next attempt", next_attempt)):
        print(f"{name}: {value}")
    return 0


def _outbox_retry(args: argparse.Namespace) -> int:
    if bool(args.ids) == args.all_dead:
        print(args.usage.rstrip(), file=sys.stderr)
        print("isthmus outbox retry: give IDs or --all-dead (one of them)", file=sys.stderr)
        return 2
    ids = None if args.all_dead else args.ids
    ok, changed = _outbox_run(args, lambda o: o.retry(ids, args.backend))
    if not ok:
        return 1
    print(f"{changed} deliveries set to pending")
    return 0 if changed else 1


def _outbox_drop(args: argparse.Namespace) -> int:
    ok, changed = _outbox_run(args, lambda o: o.drop(args.ids))
    if not ok:
        return 1
    print(f"{changed} deliveries dropped")
    return 0 if changed else 1


# -- translate --------------------------------------------------------------------------


def _translate(args: argparse.Namespace) -> int:
    from gateway.app import load_translator

    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        print(f"isthmus translate: {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    looks_like_json = data.lstrip()[:1] in (b"{", b"[")
    target = args.to or ("hl7" if looks_like_json else "fhir")
    settings = _settings(args)
    if target == "hl7":
        return _fhir_to_hl7(data, args.event)
    translator = _tables_or_exit(lambda: load_translator(settings))
    if translator is None:
        return 2
    return _hl7_to_fhir(translator, data, args.pretty)


def _hl7_to_fhir(translator: Any, data: bytes, pretty: bool) -> int:
    from gateway.fhir.bundle import dumps, to_bundle
    from gateway.hl7.batch import split_messages
    from gateway.hl7.errors import Hl7Error
    from gateway.hl7.message import check_header, parse_message
    from gateway.mapping.errors import TranslationError

    bundles = []
    try:
        messages = split_messages(data)
    except Hl7Error as exc:
        print(f"isthmus translate: {exc.location or 'input'}: {exc.reason}", file=sys.stderr)
        return 2
    if not messages:
        print("isthmus translate: the input holds no HL7 v2 message", file=sys.stderr)
        return 2
    for number, raw in enumerate(messages, 1):
        prefix = f"message {number}: " if len(messages) > 1 else ""
        try:
            message = parse_message(raw)
            check_header(message.header)
            bundles.append(to_bundle(translator.translate(message)))
        except Hl7Error as exc:
            where = f"{exc.location}: " if exc.location else ""
            print(f"isthmus translate: {prefix}{where}{exc.reason}", file=sys.stderr)
            return 2
        except TranslationError as exc:
            print(f"isthmus translate: {prefix}{exc}", file=sys.stderr)
            return 2
    document: Any = bundles[0] if len(bundles) == 1 else bundles
    sys.stdout.buffer.write(dumps(document, pretty=pretty) + b"\n")
    return 0


def _fhir_to_hl7(data: bytes, event: str | None) -> int:
    import orjson

    try:
        from gateway.mapping.to_v2 import Reverser
    except ImportError:
        print("isthmus translate: FHIR to HL7 v2 is not available in this build",
              file=sys.stderr)
        return 2
    from gateway.mapping.errors import TranslationError

    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        print(f"isthmus translate: the input is not JSON (line {exc.lineno}, column "
              f"{exc.colno})", file=sys.stderr)
        return 2
    if not isinstance(document, dict):
        print("isthmus translate: expected a FHIR resource or Bundle (a JSON object)",
              file=sys.stderr)
        return 2
    reverser = _tables_or_exit(Reverser.load)
    if reverser is None:
        return 2
    try:
        messages = reverser.to_v2(document, event=event)
    except (TranslationError, ValueError) as exc:
        print(f"isthmus translate: {exc}", file=sys.stderr)
        return 2
    for message in messages:
        sys.stdout.write(message.replace("\r", "\n") if sys.stdout.isatty() else message)
        sys.stdout.write("\n")
    return 0


# -- mappings check ---------------------------------------------------------------------


def _mappings_check(args: argparse.Namespace) -> int:
    from gateway.fhir.search import TABLE as SEARCH_TABLE
    from gateway.fhir.search import SearchRegistry, SearchTableError
    from gateway.mapping.engine import Translator
    from gateway.mapping.errors import TableError, TableErrors
    from gateway.mapping.tables import SHIPPED
    from gateway.mapping.to_v2 import Reverser

    tables = args.tables or SHIPPED
    search_table = (args.dir / SEARCH_TABLE if args.dir is not None
                    and (args.dir / SEARCH_TABLE).is_file() else tables / SEARCH_TABLE)
    try:
        translator = Translator.load(tables, args.dir)
        reverser = Reverser.load(tables, args.dir)
        registry = SearchRegistry.load(search_table)
    except SearchTableError as exc:
        print(exc, file=sys.stderr)
        return 2
    except TableErrors as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        print(f"{len(exc.errors)} problem(s) found", file=sys.stderr)
        return 2
    except TableError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"ok: {len(translator.message_types)} message types "
          f"({', '.join(translator.message_types)})")
    outbound = sorted(reverser.message_types.items())
    print(f"ok: FHIR to v2 for {', '.join(f'{t} ({chr(47).join(m)})' for t, m in outbound)}")
    print(f"ok: FHIR search parameters for {len(registry.types())} resource types")
    return 0


# -- auth -------------------------------------------------------------------------------


def _auth_api_key(args: argparse.Namespace) -> int:
    import hashlib
    import json
    import re
    import secrets

    from gateway.policy.scopes import ScopeError, ScopeSet

    if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", args.name):
        print("isthmus auth api-key: the name may hold letters, digits and . _ @ - only",
              file=sys.stderr)
        return 2
    scopes = args.scope or ["system/*.rs"]
    try:
        ScopeSet.parse(scopes)
    except ScopeError as exc:
        print(f"isthmus auth api-key: {exc}", file=sys.stderr)
        return 2
    key = secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    print(f"# API key '{args.name}' (shown once; send it as the X-API-Key header):")
    print(key)
    print("# add to the config file:")
    print("[[auth.api_keys]]")
    print(f"name = {json.dumps(args.name)}")
    print(f'key_sha256 = "{digest}"')
    print(f"scopes = {json.dumps(scopes)}")
    if args.profile:
        print(f"profile = {json.dumps(args.profile)}")
    return 0


# -- audit ------------------------------------------------------------------------------

_EXPORT_PURPOSE = "HCOMPL"  # v3 ActReason: health compliance


def _audit_parser(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the audit trail: verify it, export it for review")
    audit.add_argument("--data-dir", type=Path, help="where the store lives (store.data_dir)")
    actions = audit.add_subparsers(metavar="ACTION")
    verify = actions.add_parser(
        "verify", help="check the audit trail, or an export of it, has not been altered")
    verify.add_argument("--file", type=Path, metavar="EXPORT",
                        help="an export to verify offline (needs --public-key)")
    verify.add_argument("--public-key", type=Path, action="append", metavar="KEY",
                        help="the gateway's public key (PEM); repeat for rotated keys")
    verify.set_defaults(run=_audit_verify)
    export = actions.add_parser(
        "export", help="records in a period as FHIR AuditEvents or CSV, on stdout")
    export.add_argument("--from", dest="start", required=True, metavar="T",
                        help="ISO 8601 date or time (UTC unless an offset is given)")
    export.add_argument("--to", dest="end", required=True, metavar="T",
                        help="end of the period, exclusive (a date includes that day)")
    export.add_argument("--patient", metavar="REF",
                        help="'AUTHORITY|ID', 'Patient/ID', or an identifier alone")
    export.add_argument("--client", metavar="ID", help="client id (e.g. 'LAB|HOSP' or 'LAB')")
    export.add_argument("--action", metavar="A",
                        help="ingest, translate, read, search, create, update, delete, "
                             "deliver, token or export")
    export.add_argument("--format", required=True, choices=("ndjson", "bundle", "csv"))
    export.add_argument("--decrypt", action="store_true",
                        help="show PHI decrypted (needs the audit data keys)")
    export.set_defaults(run=_audit_export)
    new_key = actions.add_parser(
        "new-key", help="print a new audit data key line, for key rotation")
    new_key.set_defaults(run=_audit_new_key)
    public_key = actions.add_parser(
        "public-key", help="print the public key reviewers verify exports with")
    public_key.set_defaults(run=_audit_public_key)


def _audit_settings(args: argparse.Namespace) -> Settings:
    return _settings(args, **{"store.data_dir": getattr(args, "data_dir", None)})


def _audit_db(settings: Settings) -> Path:
    from gateway.audit import AUDIT_FILE

    path = settings.store.data_dir / AUDIT_FILE
    if not path.exists():
        raise ConfigError(f"no audit trail at {path} (set --data-dir or store.data_dir)")
    return path


def _audit_verify(args: argparse.Namespace) -> int:
    from gateway.app import audit_keys
    from gateway.audit import AuditKeyError, verify_store
    from gateway.audit.export import verify_export
    from gateway.audit.keys import key_id, read_public_keys

    if args.file is not None and not args.public_key:
        print("isthmus audit verify: --file needs --public-key KEY, the public key of the "
              "gateway that made the export", file=sys.stderr)
        return 2
    try:
        trusted = {key_id(k): k for path in args.public_key or ()
                   for k in read_public_keys(path)}
        if args.file is not None:
            report = verify_export(args.file.read_bytes(), trusted)
        else:
            settings = _audit_settings(args)
            path = _audit_db(settings)
            signing = None
            if not trusted:
                keys = audit_keys(settings, need_data_keys=False)
                trusted, signing = dict(keys.trusted), keys.signing
            report = asyncio.run(verify_store(path, trusted, signing))
            if signing is None:
                print("note: record MACs not checked (they need the signing key); the chain "
                      "and the signed checkpoints were")
    except (AuditKeyError, OSError) as exc:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        print(f"isthmus audit verify: {where}{text}", file=sys.stderr)
        return 2
    print(report.summary())
    problems = report.sorted_problems()
    for problem in problems[1:20]:
        print(f"  also {problem}")
    if len(problems) > 20:
        print(f"  and {len(problems) - 20} more")
    return 0 if report.ok else 1


def _audit_export(args: argparse.Namespace) -> int:
    from gateway.audit import AuditIntegrityError, AuditKeyError, QueryError, build_query

    settings = _audit_settings(args)
    try:
        query = build_query(args.start, args.end, args.patient, args.client, args.action,
                            names=("--from", "--to", "--patient", "--client", "--action"))
    except QueryError as exc:
        print(f"isthmus audit export: {exc}", file=sys.stderr)
        return 2
    _audit_db(settings)
    try:
        return asyncio.run(_export(settings, query, args.format, args.decrypt))
    except AuditKeyError as exc:
        print(f"isthmus audit export: {exc}", file=sys.stderr)
        return 2
    except AuditIntegrityError as exc:
        print(f"isthmus audit export: the audit trail does not verify ({exc}); run "
              "`isthmus audit verify`. Nothing was exported.", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader stopped early (`| head`): not an error of the export.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (sqlite3.Error, OSError) as exc:
        print(f"isthmus audit export: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


async def _export(settings: Settings, query: Any, fmt: str, decrypt: bool) -> int:
    from gateway.app import open_audit
    from gateway.audit import Action, AuditRecord
    from gateway.audit.export import export
    from gateway.store import StoreUnavailable

    user, host = _who()
    audit = await open_audit(settings, gateway=False)
    try:
        # Fail closed: the export is on record before a byte of it is written.
        try:
            await audit.record(AuditRecord(
                Action.EXPORT, client_id="isthmus-cli", user=user, peer=host,
                resource_type="AuditEvent", patient=query.patient, query=query.text(),
                query_shape=query.text(with_patient=False), purpose=_EXPORT_PURPOSE,
                detail=f"{fmt}{' decrypted' if decrypt else ''}"))
        except StoreUnavailable:
            print("isthmus audit export: the export could not be recorded in the audit "
                  "trail; nothing was exported", file=sys.stderr)
            return 1
        covered = await audit.seal_head()
        out = sys.stdout.buffer
        result = await export(audit, query, fmt, out.write, covered_through=covered,
                              decrypt=decrypt, exporter=f"cli:{user}@{host}")
        out.flush()
    finally:
        await audit.close()
    print(f"isthmus audit export: {result.records} records", file=sys.stderr)
    if result.undecryptable:
        print(f"isthmus audit export: {result.undecryptable} records could not be decrypted "
              "(their data key is not loaded); shown encrypted", file=sys.stderr)
    return 0


def _who() -> tuple[str, str]:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return user, socket.gethostname()


def _message_access(action: str, inbox_id: int, raw: bytes, control_id: str = "",
                    outcome: str = "success") -> Any:
    """The record of an operator's access to a stored message (the patient from PID-3)."""
    from gateway.audit import Action, AuditRecord, reference_from_v2
    from gateway.hl7.message import parse_message

    try:
        patient = reference_from_v2(parse_message(raw))
    except Exception:  # noqa: BLE001 - a stored message that does not parse has no patient
        patient = None
    user, host = _who()
    return AuditRecord(Action(action), "success" if outcome == "translated" else outcome,
                       client_id="isthmus-cli", user=user, peer=host,
                       resource_type="hl7v2-message", resource_id=str(inbox_id),
                       control_id=control_id, patient=patient)


def _record_accesses(args: argparse.Namespace, records: list[Any]) -> str | None:
    """Record operator accesses before they happen; the reason when that is not possible."""
    from gateway.app import open_audit
    from gateway.audit import AuditIntegrityError, AuditKeyError
    from gateway.store import StoreUnavailable

    settings = _audit_settings(args)
    if not settings.audit.enabled or not records:
        return None

    async def record() -> None:
        audit = await open_audit(settings, gateway=False)
        try:
            for future in [audit.submit(r) for r in records]:
                await future
        finally:
            await audit.close()

    try:
        asyncio.run(record())
    except (AuditKeyError, AuditIntegrityError, StoreUnavailable, sqlite3.Error,
            OSError) as exc:
        reason = exc if isinstance(exc, AuditKeyError) else type(exc).__name__
        return f"the access could not be recorded in the audit trail ({reason})"
    return None


def _audit_new_key(args: argparse.Namespace) -> int:
    from gateway.audit.keys import new_data_key_line

    print(new_data_key_line())
    return 0


def _audit_public_key(args: argparse.Namespace) -> int:
    from gateway.app import audit_keys
    from gateway.audit import AuditKeyError
    from gateway.audit.keys import public_pem

    try:
        keys = audit_keys(_audit_settings(args), need_data_keys=False)
    except AuditKeyError as exc:
        print(f"isthmus audit public-key: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(public_pem(keys.signing.public))
    return 0
