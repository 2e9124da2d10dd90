"""`isthmus audit verify|export|new-key|public-key`: the audit trail checked, exported
for review (on record before a byte of it is written), and its keys."""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.access import who
from gateway.cli.shared import audit_settings, database_pool
from gateway.config import ConfigError, Settings

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from gateway.audit.anchor import Head
    from gateway.audit.keys import SigningKey
    from gateway.audit.query import AuditQuery
    from gateway.audit.verify import Report
    from gateway.cli.shared import Subparsers

_EXPORT_PURPOSE = "HCOMPL"  # v3 ActReason: health compliance


def add_parser(sub: Subparsers) -> None:
    audit = sub.add_parser("audit", help="the audit trail: verify it, export it for review")
    audit.add_argument("--data-dir", type=Path, help="where the store lives (store.data_dir)")
    actions = audit.add_subparsers(metavar="ACTION")
    verify = actions.add_parser(
        "verify", help="check the audit trail, or an export of it, has not been altered")
    verify.add_argument("--file", type=Path, metavar="EXPORT",
                        help="an export to verify offline (needs --public-key)")
    verify.add_argument("--public-key", type=Path, action="append", metavar="KEY",
                        help="the gateway's public key (PEM); repeat for rotated keys")
    verify.add_argument("--expect-head", action="append", metavar="SEQ:HASH",
                        help="a head kept outside the store (record number and chain hash) "
                             "the trail must reach: catches a rollback or truncation; "
                             "repeat for several")
    verify.add_argument("--expect-head-file", type=Path, action="append", metavar="FILE",
                        help="heads to reach, from a file or directory: the published "
                             "checkpoints (audit.checkpoint_publish, read by default), a "
                             "witness's copies, the 'audit checkpoint signed' log lines, or "
                             "SEQ:HASH lines")
    verify.set_defaults(run=_audit_verify)
    export = actions.add_parser(
        "export", help="records in a period as FHIR AuditEvents or CSV, on stdout",
        description="Without --from and --to, every record in the trail is exported; "
                    "either alone leaves that end of the period open.")
    export.add_argument("--from", dest="start", metavar="T",
                        help="ISO 8601 date or time (UTC unless an offset is given); "
                             "default: the first record")
    export.add_argument("--to", dest="end", metavar="T",
                        help="end of the period, exclusive (a date includes that day); "
                             "default: the last record")
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


def _audit_db(settings: Settings) -> Path | None:
    """The audit.db to read; None when the trail is in PostgreSQL (store.backend)."""
    from gateway.audit.log import AUDIT_FILE

    if settings.store.backend == "postgresql":
        return None

    path = settings.store.data_dir / AUDIT_FILE
    if not path.exists():
        raise ConfigError(f"no audit trail at {path} (set --data-dir or store.data_dir)")
    return path


def _audit_verify(args: argparse.Namespace) -> int:
    from gateway.app.audit import audit_keys
    from gateway.audit.anchor import AnchorError
    from gateway.audit.export import verify_export
    from gateway.audit.keys import AuditKeyError, key_id, read_public_keys
    from gateway.audit.log import verify_store

    if args.file is not None and not args.public_key:
        print("isthmus audit verify: --file needs --public-key KEY, the public key of the "
              "gateway that made the export", file=sys.stderr)
        return 2
    if args.file is not None and (args.expect_head or args.expect_head_file):
        print("isthmus audit verify: --expect-head and --expect-head-file check the live "
              "store, not an export (--file)", file=sys.stderr)
        return 2
    notes: list[str] = []  # printed after the verdict, whose line comes first
    try:
        trusted = {key_id(k): k for path in args.public_key or ()
                   for k in read_public_keys(path)}
        if args.file is not None:
            report = verify_export(args.file.read_bytes(), trusted)
        else:
            settings = audit_settings(args)
            path = _audit_db(settings)
            heads = _expected_heads(args, settings)
            signing = None
            if not trusted:
                keys = audit_keys(settings, need_data_keys=False)
                trusted, signing = dict(keys.trusted), keys.signing
            report = asyncio.run(
                verify_store(path, trusted, signing, heads or None) if path is not None
                else _verify_database(settings, trusted, signing, heads or None))
            if signing is None:
                print("note: record MACs not checked (they need the signing key); the chain "
                      "and the signed checkpoints were")
            if not heads:
                notes.append("note: no head kept outside the store was given "
                             "(--expect-head, --expect-head-file, audit.checkpoint_publish): "
                             "a rollback, or a truncation together with its checkpoints, "
                             "cannot be told from the store alone")
    except (AuditKeyError, AnchorError, OSError) as exc:
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
    for note in notes:
        print(note)
    return 0 if report.ok else 1


async def _verify_database(settings: Settings, trusted: Mapping[str, Ed25519PublicKey],
                           signing: SigningKey | None, heads: list[Head] | None) -> Report:
    """`verify_store` on the PostgreSQL audit tables the settings name."""
    from gateway.app.specs import pg_spec
    from gateway.audit.log import verify_reader
    from gateway.store.pg.audit import PgAuditReader
    from gateway.store.pg.connect import connect

    connection = await connect(pg_spec(settings))
    try:
        return await verify_reader(PgAuditReader(connection), trusted, signing, heads)
    finally:
        await connection.close()


def _expected_heads(args: argparse.Namespace, settings: Settings) -> list[Head]:
    """The heads the store must reach: given on the command line, and those published
    where the configuration says (audit.checkpoint_publish)."""
    from gateway.audit.anchor import AnchorError, parse_head, read_heads

    heads = [parse_head(text, "--expect-head") for text in args.expect_head or ()]
    files = list(args.expect_head_file or ())
    published = settings.audit.checkpoint_publish
    if published is not None and published.exists() and published not in files:
        files.append(published)
    for path in files:
        found = read_heads(path)
        if not found:
            raise AnchorError(f"{path}: holds no audit head")
        heads.extend(found)
    return heads


def _audit_export(args: argparse.Namespace) -> int:
    from gateway.audit.keys import AuditKeyError
    from gateway.audit.log import AuditIntegrityError
    from gateway.audit.query import QueryError, build_query

    settings = audit_settings(args)
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


async def _export(settings: Settings, query: AuditQuery, fmt: str, decrypt: bool) -> int:
    user, host = who()
    async with database_pool(settings) as pool:
        return await _export_from(settings, query, fmt, decrypt, pool, user, host)


async def _export_from(settings: Settings, query: AuditQuery, fmt: str, decrypt: bool,
                       pool: object | None, user: str, host: str) -> int:
    from gateway.app.audit import open_audit
    from gateway.audit.export import export
    from gateway.audit.record import Action, AuditRecord
    from gateway.store.errors import StoreUnavailable

    audit = await open_audit(settings, gateway=False, pool=pool)
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


def _audit_new_key(args: argparse.Namespace) -> int:
    from gateway.audit.keys import new_data_key_line

    print(new_data_key_line())
    return 0


def _audit_public_key(args: argparse.Namespace) -> int:
    from gateway.app.audit import audit_keys
    from gateway.audit.keys import AuditKeyError, public_pem

    try:
        keys = audit_keys(audit_settings(args), need_data_keys=False)
    except AuditKeyError as exc:
        print(f"isthmus audit public-key: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(public_pem(keys.signing.public))
    return 0
