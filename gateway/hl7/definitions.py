"""HL7 v2 reference definitions per version, compiled once from hl7apy into plain lookups.

hl7apy's parser is far too slow for the MLLP hot path (~35 ms a message), but its reference
modules (`hl7apy/v2_x/segments.py`, `fields.py`, `tables.py`, `messages.py`) are the HL7
standard as data. This module reads them once per version (on first use) and keeps only what
validation and the ERR segment need, as frozen dataclasses and frozensets, so that a segment
id, a message type or a table value is one hash lookup.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from types import MappingProxyType, ModuleType
from typing import Any

from gateway.hl7.message import VERSIONS

# MSH-12 version -> the hl7apy library that defines it. hl7apy 1.3.5 ships no v2.7.1
# library; 2.7.1 is a technical correction of 2.7 (same segments, fields and message
# types), so it reads the 2.7 definitions.
_LIBRARY_SUBSTITUTES = {"2.7.1": "2.7"}
LIBRARY_FOR_VERSION: Mapping[str, str] = MappingProxyType(
    {version: _LIBRARY_SUBSTITUTES.get(version, version) for version in VERSIONS})

# hl7apy ships HL7 tables from v2.3.1 on. For 2.1-2.3 the known message types and events
# are those their own message definitions name plus 2.3.1's tables 0076 and 0003: a
# superset, chosen because refusing a valid old message is worse than accepting a rare
# event that was only defined a version later. Field values are not table-checked there.
_TABLES_FALLBACK_LIBRARY = "2.3.1"

MESSAGE_TYPE_TABLE = "0076"
EVENT_TYPE_TABLE = "0003"
MESSAGE_STRUCTURE_TABLE = "0354"

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
_MESSAGE_CODE = re.compile(r"[A-Z][A-Z0-9]{2}")
# An event as message structure names carry it (ADT_A01, PPR_PC1); structure-only suffixes
# such as RAR (RAR_RAR) or the placeholders Knn/Qnn do not match.
_EVENT_IN_STRUCTURE = re.compile(r"[A-Z][A-Z0-9][0-9]")


@dataclass(frozen=True, slots=True)
class FieldDef:
    """One field of a segment as HL7 defines it for a version."""

    number: int
    name: str  # hl7apy's element name, e.g. "PID_7"
    long_name: str  # e.g. "DATE_TIME_OF_BIRTH"
    datatype: str  # e.g. "TS", "ID", "XPN"
    required: bool
    max_repetitions: int | None  # None: unbounded; 0: withdrawn (kept for compatibility)
    table: str | None  # HL7 table number, e.g. "0001"

    @property
    def withdrawn(self) -> bool:
        """HL7 v2.6+ optionality W: the field no longer carries data in this version."""
        return self.max_repetitions == 0


@dataclass(frozen=True, slots=True)
class SegmentDef:
    """A segment's fields, by field number (numbers withdrawn outright are absent)."""

    id: str
    fields: tuple[FieldDef, ...]

    def field(self, number: int) -> FieldDef | None:
        for definition in self.fields:
            if definition.number == number:
                return definition
        return None


@dataclass(frozen=True, slots=True)
class Table:
    """An HL7 table with the values hl7apy lists for it."""

    number: str
    name: str
    values: frozenset[str]


@dataclass(frozen=True, slots=True)
class Definitions:
    """Everything validation needs to know about one HL7 version."""

    version: str  # as asked for (MSH-12)
    library: str  # the hl7apy library it was compiled from
    segments: Mapping[str, SegmentDef]
    segment_ids: frozenset[str]
    message_codes: frozenset[str]  # HL7 table 0076
    trigger_events: frozenset[str]  # HL7 table 0003
    structures: frozenset[str]  # HL7 table 0354 and hl7apy's message definitions
    tables: Mapping[str, Table]  # only tables with at least one value


@dataclass(frozen=True, slots=True)
class KnownIds:
    """Segment ids, message codes and events defined in any HL7 version hl7apy knows."""

    segment_ids: frozenset[str]
    message_codes: frozenset[str]
    trigger_events: frozenset[str]


def library_version(version: str) -> str:
    """The hl7apy library version defining MSH-12 `version`; KeyError when unsupported."""
    return LIBRARY_FOR_VERSION[version]


@cache
def definitions(version: str) -> Definitions:
    """The compiled definitions of one HL7 version, built on first use and then shared."""
    return replace(_compile(library_version(version)), version=version)


def preload(versions: Iterable[str] = VERSIONS) -> None:
    """Compile now what validation would otherwise compile on its first message.

    Meant for start-up, off the event loop: every version plus the any-version fallback
    take ~0.15 s and ~20 MB; one version alone ~20-50 ms.
    """
    for version in versions:
        definitions(version)
    known_anywhere()


@cache
def _compile(library: str) -> Definitions:
    """One hl7apy library read into lookups (2.7 serves both 2.7 and 2.7.1)."""
    module = _module(library)
    segments = _segments(module)
    tables = _tables(module)
    structures = _structure_names(module)
    code_values, event_values = _type_tables(module, tables)
    return Definitions(
        version=library,
        library=library,
        segments=MappingProxyType(segments),
        segment_ids=frozenset(segments),
        message_codes=frozenset(code_values) | _codes_from(structures),
        trigger_events=frozenset(event_values) | _events_from(structures),
        structures=structures | _table_values(tables, MESSAGE_STRUCTURE_TABLE),
        tables=MappingProxyType(tables),
    )


@cache
def known_anywhere() -> KnownIds:
    """What any HL7 version defines: the fallback when a sender uses another version's id.

    Compiles every version, so it is consulted only after a per-version lookup missed.
    """
    every = [_compile(library) for library in set(LIBRARY_FOR_VERSION.values())]
    return KnownIds(
        segment_ids=frozenset().union(*(d.segment_ids for d in every)),
        message_codes=frozenset().union(*(d.message_codes for d in every)),
        trigger_events=frozenset().union(*(d.trigger_events for d in every)),
    )


def first_version_defining(segment_id: str) -> str | None:
    """The earliest HL7 version that defines a segment id, for error reasons."""
    for version in LIBRARY_FOR_VERSION:
        if segment_id in definitions(version).segment_ids:
            return version
    return None


# -- compiling hl7apy's reference structures -------------------------------------------------


def _module(library: str) -> ModuleType:
    return importlib.import_module("hl7apy.v" + library.replace(".", "_"))


def _segments(module: ModuleType) -> dict[str, SegmentDef]:
    fields: Mapping[str, Any] = module.FIELDS
    segments: dict[str, SegmentDef] = {}
    for seg_id, reference in module.SEGMENTS.items():
        # Skips hl7apy's pseudo segments, such as the ANYHL7SEGMENT choice.
        if _SEGMENT_ID.fullmatch(seg_id):
            children = _segment_children(reference)
            defs = (_field(child, fields) for child in children)
            segments[seg_id] = SegmentDef(seg_id, tuple(d for d in defs if d is not None))
    return segments


def _segment_children(reference: Any) -> tuple[Any, ...]:
    """A segment's field entries: ('sequence', ((name, ref, (min, max), 'FIE'), ...))."""
    if not reference:
        return ()
    if reference[0] == "sequence":
        # v2.7 QRD/QRF/URD/URS are withdrawn and defined as a bare ('sequence',).
        return tuple(reference[1]) if len(reference) > 1 else ()
    if isinstance(reference[0], tuple):
        # hl7apy's v2.1 ORO lacks the ('sequence', ...) wrapper around its fields.
        return tuple(reference)
    return ()


def _field(child: Any, fields: Mapping[str, Any]) -> FieldDef | None:
    """Compile one (name, ref, (min, max), 'FIE') entry; None when it is not a field."""
    if len(child) != 4 or child[3] != "FIE":
        return None
    name, own_reference, (minimum, maximum), _ = child
    reference = fields.get(name, own_reference)
    # Numbers come from the name: v2.6+ drop some withdrawn fields from the sequence.
    number = int(str(name).rsplit("_", 1)[1])
    # ('leaf'|'sequence', structure, datatype, long name, table, max length); v2.1 RX1_30
    # carries one extra item after the datatype, so name and table are read from the end.
    table = reference[-2]
    return FieldDef(
        number=number,
        name=str(name),
        long_name=str(reference[-3]),
        datatype=str(reference[2]),
        required=int(minimum) >= 1,
        max_repetitions=None if int(maximum) < 0 else int(maximum),
        table=_table_number(table) if table else None,
    )


def _table_number(name: str) -> str:
    return name[3:] if name.startswith("HL7") else name


def _tables(module: ModuleType) -> dict[str, Table]:
    tables: dict[str, Table] = {}
    for name, (title, values) in module.ELEMENTS["Table"].items():
        if values:
            number = _table_number(str(name))
            tables[number] = Table(number, str(title), frozenset(str(v) for v in values))
    return tables


def _table_values(tables: Mapping[str, Table], number: str) -> frozenset[str]:
    table = tables.get(number)
    return table.values if table is not None else frozenset()


def _type_tables(
    module: ModuleType, tables: Mapping[str, Table]
) -> tuple[frozenset[str], frozenset[str]]:
    """Tables 0076 and 0003, borrowed from v2.3.1 by the versions hl7apy has none for."""
    if MESSAGE_TYPE_TABLE not in tables:
        tables = _tables(_module(_TABLES_FALLBACK_LIBRARY))
    return (_table_values(tables, MESSAGE_TYPE_TABLE), _table_values(tables, EVENT_TYPE_TABLE))


def _structure_names(module: ModuleType) -> frozenset[str]:
    return frozenset(str(name) for name in module.MESSAGES)


def _codes_from(structures: Iterable[str]) -> frozenset[str]:
    codes = (name.split("_", 1)[0] for name in structures)
    return frozenset(code for code in codes if _MESSAGE_CODE.fullmatch(code))


def _events_from(structures: Iterable[str]) -> frozenset[str]:
    events = (name.split("_", 1)[1] for name in structures if "_" in name)
    return frozenset(event for event in events if _EVENT_IN_STRUCTURE.fullmatch(event))
