"""`isthmus serve`: run the gateway, and say in one line why it cannot start."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.shared import configure_logging, settings_from

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers


def add_parser(sub: Subparsers) -> None:
    serve = sub.add_parser("serve", help="run the gateway (MLLP and HTTP listeners)")
    serve.add_argument("--host", help="address to listen on (server.host)")
    serve.add_argument("--mllp-port", type=int, help="MLLP port, 0 for any free port")
    serve.add_argument("--http-port", type=int, help="HTTP port, 0 for any free port")
    serve.add_argument("--data-dir", type=Path, help="where the store lives (store.data_dir)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="apply worker processes beside the edge (processes.workers; "
                            "default: one per core but the edge's, 0: apply in the edge)")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from gateway.app.server import serve
    from gateway.audit.errors import AuditError
    from gateway.mapping.errors import TableError, TableErrors
    from gateway.store.errors import DataDirError, StoreUnavailable
    from gateway.store.sealing import SealError

    settings = settings_from(args, **{
        "server.host": args.host, "mllp.port": args.mllp_port,
        "server.http_port": args.http_port, "store.data_dir": args.data_dir,
        "processes.workers": args.workers,
    })
    configure_logging(settings.log.level)
    try:
        return asyncio.run(serve(settings))
    except DataDirError as exc:  # open to other users, or another gateway holds it
        print(f"isthmus: {exc}", file=sys.stderr)
        return 1
    except SealError as exc:  # a data key missing or wrong, a migration unfinished
        print(f"isthmus: the store in {settings.store.data_dir} cannot be opened: {exc}",
              file=sys.stderr)
        return 1
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
    except StoreUnavailable as exc:  # the database (store.backend = "postgresql")
        print(f"isthmus: the store cannot be opened: {exc}", file=sys.stderr)
        return 1
    except (TableErrors, TableError) as exc:
        print(f"isthmus: the mapping tables are not usable:\n{exc}", file=sys.stderr)
        return 2
    except AuditError as exc:  # keys, integrity (a rolled-back trail), publishing
        print(f"isthmus: the audit trail cannot be opened: {exc}", file=sys.stderr)
        return 1
