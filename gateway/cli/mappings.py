"""`isthmus mappings check`: the tables (and a site's overrides) checked as a start-up
would, every problem as `file:line: reason`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers


def add_parser(sub: Subparsers) -> None:
    mappings = sub.add_parser("mappings", help="the mapping tables")
    mappings_sub = mappings.add_subparsers(metavar="ACTION")
    check = mappings_sub.add_parser(
        "check", help="check the tables (and a site's overrides) as a start-up would")
    check.add_argument("dir", nargs="?", type=Path, metavar="DIR",
                       help="a site directory overriding the shipped tables")
    check.add_argument("--tables", type=Path, help="check this table set instead of the shipped")
    check.add_argument("--against", type=Path, metavar="FILE.json",
                       help="report which vendor table rows this payload (a resource or a "
                            "Bundle) would hit")
    check.add_argument("--vendor", action="append", metavar="NAME",
                       help="the vendor table(s) to report on (default: every one)")
    check.set_defaults(run=_mappings_check)


def _mappings_check(args: argparse.Namespace) -> int:
    from gateway.agent.matching import MatchingRules
    from gateway.cli.vendor_report import check_vendor_tables
    from gateway.fhir.search import TABLE as SEARCH_TABLE
    from gateway.fhir.search import SearchRegistry, SearchTableError
    from gateway.ingest.webhook_events import load_shapes
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
        MatchingRules.load(tables, args.dir)
        shapes = load_shapes(tables, args.dir)
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
    print("ok: the agent API's caller matching rules")
    print("ok: webhook shapes " + ", ".join(f"{name} ({count} rows)"
                                            for name, count in shapes.items()))
    return check_vendor_tables(tables, args.dir, args.vendor, args.against)
