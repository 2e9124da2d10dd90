"""The vendor tables in `isthmus mappings check`: each loaded as a start-up would, and
with `--against FILE.json` the report of which rows a payload would hit, so a row that
matches nothing real shows before a site relies on it."""

from __future__ import annotations

import sys
from pathlib import Path

from gateway.fhir import jsonio
from gateway.forward.normalize import FOLDER, Normalizer, load_vendor
from gateway.forward.vendor_rows import DECLARATIONS
from gateway.mapping.errors import TableError

# The largest payload the report reads (a searchset of a few thousand resources).
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024


def check_vendor_tables(tables: Path, site: Path | None, names: list[str] | None,
                        against: Path | None) -> int:
    """Load the vendor tables (those named, else every one shipped or in the site) and
    report on a payload; 2 with one line per problem."""
    wanted = names or _table_names(tables, site)
    loaded: list[Normalizer] = []
    for name in wanted:
        try:
            loaded.append(load_vendor(name, tables, site))
        except TableError as exc:
            print(exc, file=sys.stderr)
            return 2
    print(f"ok: vendor tables {', '.join(f'{n.name} ({len(n.rules)} rows)' for n in loaded)}"
          if loaded else "ok: no vendor tables")
    if against is None:
        return 0
    document = _payload(against)
    if document is None:
        return 2
    for normalizer in loaded:
        _report(normalizer, document, against)
    return 0


def _table_names(tables: Path, site: Path | None) -> list[str]:
    found = {path.stem for folder in (tables / FOLDER, site / FOLDER if site else None)
             if folder is not None and folder.is_dir() for path in folder.glob("*.csv")}
    return sorted(found)


def _payload(path: Path) -> dict[str, object] | None:
    try:
        if path.stat().st_size > MAX_PAYLOAD_BYTES:
            print(f"{path}: larger than {MAX_PAYLOAD_BYTES} bytes", file=sys.stderr)
            return None
        document = jsonio.loads(path.read_bytes())
    except OSError as exc:
        print(f"{path}: cannot be read ({exc.strerror})", file=sys.stderr)
        return None
    except ValueError:
        print(f"{path}: not JSON", file=sys.stderr)
        return None
    if not isinstance(document, dict) or not isinstance(document.get("resourceType"), str):
        print(f"{path}: not a FHIR resource or Bundle (no resourceType)", file=sys.stderr)
        return None
    return document


def _report(normalizer: Normalizer, document: dict[str, object], against: Path) -> None:
    """One line per row (`file:line: resource rule path from: N hit(s)`), then a total.
    Request rows (search-param, operation) say so: a payload cannot hit them."""
    counts = normalizer.hits_on(document)
    answer_rows = [r for r in normalizer.rules if r.rule not in DECLARATIONS]
    hit = [r for r in answer_rows if counts.get(r.line)]
    print(f"{normalizer.name}: {len(hit)} of {len(answer_rows)} answer rows hit by "
          f"{against.name}")
    for rule in normalizer.rules:
        what = " ".join(p for p in (rule.resource, rule.rule, ".".join(rule.steps),
                                    rule.source) if p)
        if rule.rule in DECLARATIONS:
            outcome = "request row (not judged on a payload)"
        elif counts.get(rule.line):
            outcome = f"{counts[rule.line]} hit(s)"
        else:
            outcome = "no hit"
        print(f"  {Path(rule.where.file).name}:{rule.line}: {what}: {outcome}")
