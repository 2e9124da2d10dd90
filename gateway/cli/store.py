"""`isthmus store encrypt|status|new-key`: seal a data dir's PHI at rest (or re-seal it
under the newest key), show how it is sealed, make a key for a rotation
(docs/encryption.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.shared import settings_from

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers


def add_parser(sub: Subparsers) -> None:
    store = sub.add_parser("store", help="encryption at rest of the data dir")
    store.add_argument("--data-dir", type=Path, help="where the store lives (store.data_dir)")
    actions = store.add_subparsers(metavar="ACTION")
    encrypt = actions.add_parser(
        "encrypt", help="seal a plaintext data dir in place, or re-seal under the newest key "
                        "(the gateway stopped)")
    encrypt.set_defaults(run=_encrypt)
    status = actions.add_parser("status", help="whether the data dir is sealed, and with "
                                               "which keys")
    status.set_defaults(run=_status)
    new_key = actions.add_parser(
        "new-key", help="print a new data key line (append it to the key file to rotate)")
    new_key.set_defaults(run=_new_key)


def _encrypt(args: argparse.Namespace) -> int:
    from gateway.app import FHIR_FILE, INBOX_FILE
    from gateway.app.sealing import key_source
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
                                      key_source(settings))
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


def _status(args: argparse.Namespace) -> int:
    from gateway.app.sealing import key_source
    from gateway.store.data_keys import read_marker
    from gateway.store.sealing import SealError

    settings = settings_from(args, **{"store.data_dir": args.data_dir})
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
