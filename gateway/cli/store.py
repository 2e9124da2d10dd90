"""`isthmus store status|encrypt|new-key|migrate|copy`: the store's state (PostgreSQL
schema migrations, or how the embedded data dir is sealed), sealing a data dir's PHI at
rest and keys for a rotation (docs/encryption.md), and moving an embedded (SQLite)
deployment into PostgreSQL (docs/deployment.md)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.shared import settings_from

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers
    from gateway.config import Settings
    from gateway.store.pg.connect import PgSpec
    from gateway.store.pg.copy import Unsealing


def add_parser(sub: Subparsers) -> None:
    store = sub.add_parser(
        "store", help="the store: encryption at rest, PostgreSQL migrations and copy")
    store.add_argument("--data-dir", type=Path, help="where the store lives (store.data_dir)")
    actions = store.add_subparsers(metavar="ACTION")
    status = actions.add_parser(
        "status", help="PostgreSQL: the schema version and pending migrations; embedded: "
                       "whether the data dir is sealed, and with which keys")
    status.set_defaults(run=_status)
    encrypt = actions.add_parser(
        "encrypt", help="seal a plaintext data dir in place, or re-seal under the newest key "
                        "(the gateway stopped)")
    encrypt.set_defaults(run=_encrypt)
    new_key = actions.add_parser(
        "new-key", help="print a new data key line (append it to the key file to rotate)")
    new_key.set_defaults(run=_new_key)
    migrate = actions.add_parser("migrate", help="apply pending schema migrations")
    migrate.add_argument("--dry-run", action="store_true",
                         help="list what would be applied, change nothing")
    migrate.set_defaults(run=_migrate)
    copy = actions.add_parser(
        "copy", help="copy an embedded deployment (its data dir) into PostgreSQL")
    copy.add_argument("--from", dest="source", required=True, metavar="sqlite://DIR",
                      help="the data dir of a stopped gateway")
    copy.add_argument("--to", dest="target", metavar="postgresql://...",
                      help="the database (default: store.url)")
    copy.set_defaults(run=_copy)


def _spec(args: argparse.Namespace, settings: Settings, url: str | None = None) -> PgSpec:
    from gateway.app.specs import pg_spec
    from gateway.config import ConfigError
    from gateway.store.pg.connect import PgSpec

    if url is not None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"isthmus store: {url.split('://')[0]}:// is not a "
                              "PostgreSQL URL (postgresql://user@host:5432/db)")
        return PgSpec(url, schema=settings.store.schema_name)
    if settings.store.backend != "postgresql":
        raise ConfigError("isthmus store: store.backend is \"sqlite\" (the embedded files "
                          "need no migrations); set store.backend = \"postgresql\" and "
                          "store.url, or ISTHMUS_STORE__BACKEND and ISTHMUS_STORE__URL")
    return replace(pg_spec(settings), pool_min_size=1, pool_max_size=2)


def _status(args: argparse.Namespace) -> int:
    from gateway.store.errors import StoreUnavailable
    from gateway.store.pg.migrate import status

    settings = settings_from(args, **{"store.data_dir": getattr(args, "data_dir", None)})
    if settings.store.backend != "postgresql":
        return _encryption_status(settings)
    spec = _spec(args, settings)
    try:
        found = asyncio.run(status(spec))
    except StoreUnavailable as exc:
        print(f"isthmus store status: {exc}", file=sys.stderr)
        return 1
    print(f"schema {spec.schema} at {spec.where}: version {found.current}, "
          f"{len(found.pending)} pending")
    for version, name, applied_at in found.applied:
        print(f"  {version:>4}  applied {applied_at}  {name}")
    for migration in found.pending:
        print(f"  {migration.version:>4}  pending  {migration.name}")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from gateway.store.errors import StoreUnavailable
    from gateway.store.pg.migrate import migrate

    spec = _spec(args, settings_from(args))
    try:
        applied = asyncio.run(migrate(spec, dry_run=args.dry_run))
    except StoreUnavailable as exc:
        print(f"isthmus store migrate: {exc}", file=sys.stderr)
        return 1
    verb = "would apply" if args.dry_run else "applied"
    for migration in applied:
        print(f"{verb} {migration.version}: {migration.name}")
    if not applied:
        print(f"schema {spec.schema} at {spec.where} is up to date")
    return 0


def _copy(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError

    source: str = args.source
    if not source.startswith("sqlite://"):
        raise ConfigError("isthmus store copy: --from takes sqlite://DIR, the data dir of "
                          "a stopped gateway")
    data_dir = Path(source.removeprefix("sqlite://"))
    if not data_dir.is_dir():
        raise ConfigError(f"isthmus store copy: {data_dir} is not a directory")
    # The source's keys are found as for a gateway on it (encryption.key_file, or the
    # data dir's own key file).
    settings = settings_from(args, **{"store.data_dir": data_dir})
    spec = _spec(args, settings, args.target)
    return asyncio.run(_copy_into(data_dir, spec, settings))


async def _copy_into(data_dir: Path, spec: PgSpec, settings: Settings) -> int:
    from gateway.store.data_dir import claim
    from gateway.store.errors import StoreError, StoreUnavailable
    from gateway.store.pg.connect import DATABASE_ERRORS, connect
    from gateway.store.pg.copy import copy_sqlite
    from gateway.store.pg.migrate import migrate

    try:
        held = claim(data_dir, allow_group_read=settings.store.allow_group_read)
    except StoreError as exc:  # a gateway is running on it
        print(f"isthmus store copy: {exc}", file=sys.stderr)
        return 1
    try:
        unsealing = _unsealing(settings)
        await migrate(spec)
        connection = await connect(spec)
        try:
            copied = await copy_sqlite(data_dir, connection, unsealing)
        finally:
            await connection.close()
    except StoreUnavailable as exc:
        print(f"isthmus store copy: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"isthmus store copy: {exc}; nothing was copied", file=sys.stderr)
        return 1
    except DATABASE_ERRORS as exc:
        print(f"isthmus store copy: the database refused the copy "
              f"({type(exc).__name__}); nothing was copied", file=sys.stderr)
        return 1
    finally:
        held.release()
    opened = " (sealed values opened, search rows made again)" if unsealing else ""
    print(f"copied {data_dir} to schema {spec.schema} at {spec.where}{opened}: "
          f"{copied.summary()}")
    return 0


def _unsealing(settings: Settings) -> Unsealing | None:
    """How a sealed data dir is opened for the copy; None for a plaintext one. Raises
    SealError (a StoreError) when its keys are missing or wrong."""
    from gateway.app.sealing import store_codec
    from gateway.app.tables import search_registry
    from gateway.hl7 import Hl7Error, parse_message
    from gateway.ingest.replay import patient_key
    from gateway.store.pg.copy import Unsealing

    codec = store_codec(settings)
    if not codec.sealed:
        return None

    def key_of(raw: bytes) -> str:
        try:
            return patient_key(parse_message(raw))
        except Hl7Error:
            return ""  # then it matches no stored key: the copy says which row

    return Unsealing(codec, search_registry(settings).index, key_of)


def _encrypt(args: argparse.Namespace) -> int:
    from gateway.app.files import FHIR_FILE, INBOX_FILE
    from gateway.app.sealing import key_source
    from gateway.app.tables import search_registry
    from gateway.store.errors import DataDirError
    from gateway.store.seal_migration import seal_data_dir
    from gateway.store.sealing import SealError

    settings = settings_from(args, **{"store.data_dir": args.data_dir})
    data_dir = settings.store.data_dir
    if not data_dir.is_dir():
        print(f"isthmus store encrypt: no data dir at {data_dir}", file=sys.stderr)
        return 1
    try:
        counts, codec = seal_data_dir(data_dir, data_dir / INBOX_FILE, data_dir / FHIR_FILE,
                                      key_source(settings),
                                      search_registry(settings).string_groups())
    except (DataDirError, SealError) as exc:
        print(f"isthmus store encrypt: {exc}", file=sys.stderr)
        return 1
    print(f"sealed {counts.inbox_values} inbox values (messages and bundles), "
          f"{counts.fhir_bodies} FHIR resource versions, {counts.index_rows} blind index rows")
    print(f"verified {counts.checked} sealed values open with key(s) "
          f"{', '.join(k.id for k in codec.ring.keys)}")
    print(f"data dir {data_dir} is encrypted: new values sealed with {codec.ring.current.id}, "
          f"blind indexes with {codec.index_key_id}")
    return 0


def _new_key(args: argparse.Namespace) -> int:
    from gateway.store.data_keys import new_key_line

    print(new_key_line())
    return 0


def _encryption_status(settings: Settings) -> int:
    from gateway.app.sealing import key_source
    from gateway.store.data_keys import read_marker
    from gateway.store.sealing import SealError

    data_dir = settings.store.data_dir
    try:
        marker = read_marker(data_dir)
    except SealError as exc:
        print(f"isthmus store status: {exc}", file=sys.stderr)
        return 1
    if marker is None:
        print(f"encryption: off (plaintext); `isthmus store encrypt --data-dir {data_dir}` "
              "seals it")
        return 0
    print(f"encryption: {marker.state}")
    print(f"keys that sealed data: {', '.join(sorted(marker.checks))}")
    print(f"blind index key: {marker.index_key}")
    print(f"keys from: {key_source(settings).describe()}")
    return 0
