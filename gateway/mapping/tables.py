"""Reading the table files of `mappings/` (and a site's overrides) into rows with file:line.

Layout of a table directory (mappings/README.md is the analyst's guide):

    events.csv              message type (ADT^A01) -> message map
    messages/<NAME>.csv     which segment becomes which resource, and how they link
    segments/<SEG>-<Type>.csv    a segment's fields -> elements of a FHIR resource
    datatypes/<DT>-<Type>.csv    a data type's components -> elements of a FHIR type
    vocabulary/<Name>.csv   v2 codes -> FHIR codes

A site directory with the same layout replaces shipped tables file by file (same relative
path) and adds new ones.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.hl7.location import ComponentLocation, Location, parse_component, parse_location
from gateway.mapping.errors import TableError, TableErrors


def _shipped() -> Path:
    """The tables shipped with Isthmus: the checkout's mappings/ (editable install, tests),
    else the copy a wheel installs under <prefix>/share/isthmus/mappings."""
    checkout = Path(__file__).resolve().parent.parent.parent / "mappings"
    if (checkout / "events.csv").is_file():
        return checkout
    return Path(sys.prefix) / "share" / "isthmus" / "mappings"


SHIPPED = _shipped()

MAP_COLUMNS = ("source", "condition", "target", "type", "map", "vocabulary", "value", "note")
MESSAGE_COLUMNS = ("segment", "after", "resource", "instance", "map", "links", "condition",
                   "note")
VOCABULARY_COLUMNS = ("code", "display", "fhir_code", "fhir_display", "fhir_system", "note")
EVENT_COLUMNS = ("message_type", "map", "note")
IDENTITY_COLUMNS = ("resource", "segment", "condition", "key", "note")
IDENTITY_FILE = "identities.csv"
MERGE_COLUMNS = ("message_type", "resource", "identifiers", "note")
MERGE_FILE = "merges.csv"
OUTBOUND_FILE = "outbound.csv"
OUTBOUND_FOLDER = "outbound"
# FHIR search parameter definitions: read by gateway.fhir.search, not a v2 mapping table.
SEARCH_FILE = "search-parameters.csv"
# FHIR backends' vendor normalisation tables: read by gateway.forward.normalize.
VENDORS_FOLDER = "vendors"
# The agent API's caller-matching rules: read by gateway.agent.matching.
AGENT_FOLDER = "agent"
# Backends' inbound webhook shapes: read by gateway.ingest.webhook_events.
WEBHOOKS_FOLDER = "webhooks"


def source_location(text: str) -> Location | ComponentLocation | None:
    """A v2 location as a table names one, None for text that is not one.

    Segment tables name a field of a segment (`PID-3`, `PID-3.1`, `PID-3.4.2`), data-type
    tables a component of their type (`CX.4`, `XAD.1.1`). Neither names an occurrence: a
    row is run for every occurrence of the segment it maps, and for every repetition of
    its field unless it names one (`IN1-9(1).1`: the first only).
    """
    if "-" in text:
        if "[" in text:
            return None
        try:
            location = parse_location(text)
        except ValueError:
            return None
        return location if location.field is not None else None
    return parse_component(text)


@dataclass(frozen=True, slots=True)
class Where:
    file: str
    line: int

    def error(self, reason: str) -> TableError:
        return TableError(self.file, self.line, reason)


@dataclass(frozen=True, slots=True)
class MapRow:
    """One row of a segment or data-type table."""

    where: Where
    source: str
    condition: str
    target: str
    type: str
    map: str
    vocabulary: str
    value: str


@dataclass(frozen=True, slots=True)
class FieldMap:
    """A segment table (PID-Patient) or a data-type table (CX-Identifier)."""

    name: str
    kind: str  # "segment" | "datatype"
    v2_type: str  # PID, CX
    target_type: str  # Patient, Identifier, uri
    file: str
    rows: tuple[MapRow, ...]


@dataclass(frozen=True, slots=True)
class MessageRow:
    where: Where
    segment: str
    after: str
    resource: str
    instance: str  # "new" | "current"
    map: str
    links: str
    condition: str


@dataclass(frozen=True, slots=True)
class MessageMap:
    name: str
    file: str
    rows: tuple[MessageRow, ...]


@dataclass(frozen=True, slots=True)
class VocabularyRow:
    where: Where
    code: str
    display: str
    fhir_code: str
    fhir_display: str
    fhir_system: str


@dataclass(frozen=True, slots=True)
class Vocabulary:
    name: str
    file: str
    rows: tuple[VocabularyRow, ...]


@dataclass(frozen=True, slots=True)
class EventRow:
    where: Where
    message_type: str
    map: str


@dataclass(frozen=True, slots=True)
class IdentityRow:
    """What makes a resource made from a segment the same record in every message
    (identities.csv): the v2 locations of `key`, when `condition` holds."""

    where: Where
    resource: str
    segment: str
    condition: str
    key: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MergeRow:
    """A message type applied to the store as a merge (merges.csv): the `resource` its
    message map links `replaced-by` another is merged into that one; `identifiers` says
    what becomes of the merged-away record's identifiers: `old` (kept on the survivor,
    use old) or `dropped` (they were wrong: A47)."""

    where: Where
    message_type: str
    resource: str
    identifiers: str


def merge_kind(resource_type: str) -> str | None:
    """How a merged-away record of this type is kept: `link` (Patient: `active` false and
    a `replaced-by` link, the survivor `replaces` it), `status` (a type without link
    whose status can say `inactive`: an Account, ADT^A41), or None (it cannot be)."""
    # Imported here: the FHIR models take ~0.3 s to load, and only a compile (not a
    # start from the generated cache) checks merge rows.
    from gateway.fhir import model as fhir_model

    def has(path: str) -> fhir_model.Element | None:
        try:
            return fhir_model.element(resource_type, path)
        except fhir_model.UnknownElement:
            return None
    if has("link") is not None and has("active") is not None:
        return "link"
    status = has("status")
    if status is not None and "inactive" in status.codes:
        return "status"
    return None


@dataclass
class TableSet:
    """Every table, by name, as read from disk (not yet checked)."""

    events: list[EventRow] = field(default_factory=list)
    messages: dict[str, MessageMap] = field(default_factory=dict)
    segments: dict[str, FieldMap] = field(default_factory=dict)
    datatypes: dict[str, FieldMap] = field(default_factory=dict)
    vocabularies: dict[str, Vocabulary] = field(default_factory=dict)
    identities: list[IdentityRow] = field(default_factory=list)
    merges: list[MergeRow] = field(default_factory=list)


def table_files(directory: Path, site: Path | None = None) -> dict[str, Path]:
    """Relative path -> file, site files replacing shipped ones of the same name."""
    files: dict[str, Path] = {}
    for root in (directory, site):
        if root is None:
            continue
        if not root.is_dir():
            raise TableError(root, 0, "is not a directory of mapping tables")
        for path in sorted(root.rglob("*.csv")):
            files[path.relative_to(root).as_posix()] = path
    return files


def read_tables(directory: Path = SHIPPED, site: Path | None = None) -> TableSet:
    """Every table file read; TableErrors lists every file that cannot be, not just the first."""
    tables = TableSet()
    errors: list[TableError] = []
    for relative, path in sorted(table_files(directory, site).items()):
        if relative == OUTBOUND_FILE or relative.startswith(OUTBOUND_FOLDER + "/"):
            continue  # FHIR -> v2 definitions: read by gateway.mapping.to_v2.outbound_tables
        if relative == SEARCH_FILE or relative.startswith((VENDORS_FOLDER + "/",
                                                           AGENT_FOLDER + "/",
                                                           WEBHOOKS_FOLDER + "/")):
            continue
        try:
            _read_table(tables, relative, path)
        except TableError as exc:
            errors.append(exc)
    if errors:
        raise TableErrors(errors)
    return tables


def _read_table(tables: TableSet, relative: str, path: Path) -> None:
    folder, _, name = relative.rpartition("/")
    stem = name[:-4]
    if folder == "" and name == "events.csv":
        tables.events.extend(_events(path))
    elif folder == "" and name == IDENTITY_FILE:
        tables.identities.extend(_identities(path))
    elif folder == "" and name == MERGE_FILE:
        tables.merges.extend(
            MergeRow(where, r["message_type"], r["resource"], r["identifiers"])
            for where, r in _records(path, MERGE_COLUMNS))
    elif folder == "messages":
        tables.messages[stem] = MessageMap(stem, str(path), tuple(_message_rows(path)))
    elif folder in ("segments", "datatypes"):
        v2_type, _, target = stem.partition("-")
        if not target:
            raise TableError(path, 0, "a table name is <V2 TYPE>-<FHIR TYPE>, e.g. "
                                      "PID-Patient or CX-Identifier")
        target_type = target.split("-")[0].split(".")[0]
        kind = "segment" if folder == "segments" else "datatype"
        bucket = tables.segments if kind == "segment" else tables.datatypes
        bucket[stem] = FieldMap(stem, kind, v2_type, target_type, str(path),
                                tuple(_map_rows(path)))
    elif folder == "vocabulary":
        tables.vocabularies[stem] = Vocabulary(stem, str(path),
                                               tuple(_vocabulary_rows(path)))
    else:
        raise TableError(path, 0, "is not in a known table folder (events.csv, "
                                  "identities.csv, merges.csv, "
                                  "messages/, segments/, datatypes/, vocabulary/)")


def records(path: Path, columns: tuple[str, ...], *, optional: tuple[str, ...] = ("note",)
            ) -> Iterator[tuple[Where, dict[str, str]]]:
    """The rows of a CSV table as column -> text, each with its file:line; the `optional`
    columns may be left out of the header (they read as empty)."""
    return _records(path, columns, optional)


def _records(path: Path, columns: tuple[str, ...], optional: tuple[str, ...] = ("note",)
             ) -> Iterator[tuple[Where, dict[str, str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TableError(path, 0, f"cannot be read: {exc}") from None
    reader = csv.reader(text.splitlines(keepends=True))
    header = next(reader, None)
    if header is None:
        raise TableError(path, 1, "is empty (a header row is required)")
    names = [h.strip() for h in header]
    unknown = [n for n in names if n not in columns]
    missing = [c for c in columns if c not in names and c not in optional]
    if unknown or missing:
        raise TableError(path, 1, "header must be " + ",".join(columns) + (
            f" (unknown: {', '.join(unknown)})" if unknown else "") + (
            f" (missing: {', '.join(missing)})" if missing else ""))
    line = 1
    for cells in reader:
        line = reader.line_num
        if not cells or all(not c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        if len(cells) > len(names):
            raise TableError(path, line, f"has {len(cells)} cells; the header has "
                                         f"{len(names)} (quote values holding commas)")
        record = {c: "" for c in columns}
        record.update({n: v.strip() for n, v in zip(names, cells, strict=False)})
        yield Where(str(path), line), record


def _map_rows(path: Path) -> Iterator[MapRow]:
    for where, r in _records(path, MAP_COLUMNS):
        yield MapRow(where, r["source"], r["condition"], r["target"], r["type"], r["map"],
                     r["vocabulary"], r["value"])


def _message_rows(path: Path) -> Iterator[MessageRow]:
    for where, r in _records(path, MESSAGE_COLUMNS):
        yield MessageRow(where, r["segment"], r["after"], r["resource"],
                         r["instance"] or "new", r["map"], r["links"], r["condition"])


def _vocabulary_rows(path: Path) -> Iterator[VocabularyRow]:
    for where, r in _records(path, VOCABULARY_COLUMNS):
        yield VocabularyRow(where, r["code"], r["display"], r["fhir_code"], r["fhir_display"],
                            r["fhir_system"])


def _events(path: Path) -> Iterator[EventRow]:
    for where, r in _records(path, EVENT_COLUMNS):
        yield EventRow(where, r["message_type"], r["map"])


def _identities(path: Path) -> Iterator[IdentityRow]:
    for where, r in _records(path, IDENTITY_COLUMNS):
        yield IdentityRow(where, r["resource"], r["segment"], r["condition"],
                          tuple(r["key"].split()))
