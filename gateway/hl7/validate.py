"""Check a parsed HL7 v2 message against the HL7 definitions of its version (MSH-12).

Levels, chosen per listener:

- "header": nothing beyond `check_header` (MSH-9/10/12/15/16 readable and supported).
- "standard", the MLLP default and on its hot path: the message type (table 0076) and
  trigger event (table 0003) and every segment id are defined by HL7 or site-defined (Z),
  and the segments the message structure requires are there (`structure.py`).
  Reads only MSH-9 (and EVN-1 when MSH-9 has no event) and the segment ids. It refuses only
  what HL7 does not define at all: a type, event or segment defined by another HL7 version
  than the message's is accepted, as senders backport them (the v2-to-FHIR IG's v2.5.1
  messages carry PRT, defined from v2.7).
- "strict": the message's own version must define its type, event and segments, and every
  segment it defines is checked field by field: required fields, repetition limits,
  primitive formats (NM, SI, DT, DTM, TS.1, TM) and ID/IS values against HL7 tables.

Errors come back in message order, at most MAX_ERRORS, each with the HL7 table 0357 code
and the location the ERR segment names. Reasons never quote a field's value: only names,
positions, data types, counts and, for MSH-9 and EVN-1, the code itself.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from gateway.hl7.definitions import (
    EVENT_TYPE_TABLE,
    LIBRARY_FOR_VERSION,
    MESSAGE_TYPE_TABLE,
    Definitions,
    FieldDef,
    SegmentDef,
    Table,
    definitions,
    first_version_defining,
    known_anywhere,
)
from gateway.hl7.delimiters import HEADER_SEGMENTS, Delimiters
from gateway.hl7.errors import ErrorCode, Hl7Error, Location
from gateway.hl7.message import Message, Segment
from gateway.hl7.structure import missing_segments

LEVELS = ("header", "standard", "strict")
MAX_ERRORS = 50
_AFTER_LAST = 1 << 30  # the sort index of what is not in the message at all

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
# A code safe to name in a reason: short and identifier-like (MSH-9 and EVN-1 are coded).
_NAMEABLE_CODE = re.compile(r"[A-Za-z0-9_]{1,8}")
_HL7_NULL = '""'
# From HL7 v2.3.1 on MSG.2 (the trigger event) is required; before it, MSH-9 may be the
# message code alone (v2.1/v2.2 carry the event in EVN-1 instead).
_EVENT_OPTIONAL_VERSIONS = frozenset({"2.1", "2.2", "2.3"})


@dataclass(frozen=True, slots=True)
class _Found:
    """An error and where it sorts: segment index in the message, then field, component."""

    index: int
    error: Hl7Error

    @property
    def order(self) -> tuple[int, int, int]:
        location = self.error.location
        if location is None:
            return (self.index, 0, 0)
        return (self.index, location.field or 0, location.component or 0)


def validate(message: Message, level: str = "standard") -> list[Hl7Error]:
    """The errors in `message` at `level` ("header", "standard" or "strict"), in order.

    Expects a message whose header passed `check_header`; an unsupported version still
    comes back as a 203 error rather than an exception.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown validation level {level!r}; expected one of {LEVELS}")
    if level == "header":
        return []
    version = message.header.version
    if version not in LIBRARY_FOR_VERSION:
        return [Hl7Error(ErrorCode.UNSUPPORTED_VERSION_ID, "version is not supported",
                         Location("MSH", 1, 12), reject=True)]
    defs = definitions(version)
    strict = level == "strict"
    found = _check_message_type(message, defs, strict)
    found.extend(_check_segment_ids(message, defs, strict))
    # A missing segment has no place in the message: it sorts after everything found.
    found.extend(_Found(_AFTER_LAST, error) for error in missing_segments(message))
    if strict:
        found.extend(_check_fields(message, defs, MAX_ERRORS - len(found)))
    if not found:
        return []
    found.sort(key=lambda item: item.order)
    return [item.error for item in found[:MAX_ERRORS]]


# -- MSH-9: message type and trigger event ----------------------------------------------------


def _check_message_type(message: Message, defs: Definitions, strict: bool) -> list[_Found]:
    """Table 0076 for MSH-9.1 and table 0003 for the event; Z codes are site-defined."""
    found: list[_Found] = []
    code = message.header.message_code
    if not (code in defs.message_codes or _site_defined(code)
            or _code_known_elsewhere(code, strict)):
        found.append(_Found(0, Hl7Error(
            ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
            f"message type {_name_code(code)} is not in HL7 table {MESSAGE_TYPE_TABLE}"
            + _scope(defs, strict),
            Location("MSH", 1, 9, component=1), reject=True)))
    if code == "ACK" or _site_defined(code):
        # An ACK may carry any event or none; a site-defined message, site-defined events.
        return found
    if (strict and not message.header.trigger_event
            and defs.version not in _EVENT_OPTIONAL_VERSIONS):
        found.append(_Found(0, Hl7Error(
            ErrorCode.REQUIRED_FIELD_MISSING, "trigger event is empty",
            Location("MSH", 1, 9, component=2))))
    event, evn = _trigger_event(message)
    if event in defs.trigger_events or not event:
        return found
    if not (_site_defined(event) or _event_known_elsewhere(event, strict)):
        index, location = ((evn.index, Location("EVN", 1, 1)) if evn is not None
                           else (0, Location("MSH", 1, 9, component=2)))
        found.append(_Found(index, Hl7Error(
            ErrorCode.UNSUPPORTED_EVENT_CODE,
            f"trigger event {_name_code(event)} is not in HL7 table {EVENT_TYPE_TABLE}"
            + _scope(defs, strict),
            location, reject=True)))
    return found


def _trigger_event(message: Message) -> tuple[str, Segment | None]:
    """The event, and the EVN segment when the event was read from there.

    MSH-9.2 when valued; else EVN-1, where HL7 v2.1/v2.2 carry it (MSH-9 holds only the
    message code there) and later versions keep it for backward compatibility.
    """
    event = message.header.trigger_event
    if event:
        return event, None
    evn = message.segment("EVN")
    if evn is None:
        return "", None
    first = evn.field(1).split(message.delimiters.repetition, 1)[0]
    return first.split(message.delimiters.component, 1)[0], evn


def _site_defined(code: str) -> bool:
    """HL7 reserves codes starting with Z for site-defined messages, events and segments."""
    return code.startswith("Z")


def _code_known_elsewhere(code: str, strict: bool) -> bool:
    """Standard also accepts a message code that another HL7 version defines."""
    return not strict and code in known_anywhere().message_codes


def _event_known_elsewhere(event: str, strict: bool) -> bool:
    """Standard also accepts an event that another HL7 version defines."""
    return not strict and event in known_anywhere().trigger_events


def _scope(defs: Definitions, strict: bool) -> str:
    return f" of v{defs.version}" if strict else " of any HL7 version"


def _name_code(code: str) -> str:
    return f"'{code}'" if _NAMEABLE_CODE.fullmatch(code) else f"({len(code)} characters)"


# -- segment ids ---------------------------------------------------------------------------


def _check_segment_ids(message: Message, defs: Definitions, strict: bool) -> list[_Found]:
    """A 100 error for each segment whose id HL7 does not define.

    The hot path is one set lookup per segment on the codec's 3-character ids; only an id
    that is neither known nor site-defined (or, in strict, every segment) has its whole id
    read, which the error needs anyway.
    """
    known = defs.segment_ids
    if not strict:
        ids = message.segment_ids
        if known.issuperset(ids) or all(_plausible(seg_id, known) for seg_id in ids):
            return []
    found: list[_Found] = []
    for position, segment in enumerate(message.segments(), start=1):
        if strict or not _plausible(segment.id, known):
            error = _segment_id_error(segment, position, defs, strict)
            if error is not None:
                found.append(_Found(segment.index, error))
    return found


def _plausible(seg_id: str, known: frozenset[str]) -> bool:
    """A 3-character id standard accepts without a closer look: known or a Z-segment."""
    return seg_id in known or (seg_id[:1] == "Z" and _SEGMENT_ID.fullmatch(seg_id) is not None)


def _segment_id_error(segment: Segment, position: int, defs: Definitions,
                      strict: bool) -> Hl7Error | None:
    """The 100 error for one segment (its 1-based `position` among all), if its id is wrong."""
    seg_id = segment.field(0)  # the text before the first field separator
    if seg_id in defs.segment_ids or not seg_id.strip():
        return None
    if not _SEGMENT_ID.fullmatch(seg_id):
        # Not an id, possibly text broken over lines: never echo it (it may be PHI); the
        # location names the segment's position in the message instead.
        return Hl7Error(ErrorCode.SEGMENT_SEQUENCE_ERROR,
                        f"segment {position} of the message does not start with a "
                        "segment id (A-Z, then two of A-Z or 0-9)",
                        Location("", position))
    if _site_defined(seg_id):
        return None
    location = Location(seg_id, segment.occurrence)
    if seg_id not in known_anywhere().segment_ids:
        return Hl7Error(ErrorCode.SEGMENT_SEQUENCE_ERROR,
                        "segment id is not defined in any HL7 version", location)
    if not strict:
        return None
    return Hl7Error(ErrorCode.SEGMENT_SEQUENCE_ERROR,
                    f"segment is not defined in HL7 v{defs.version} "
                    f"(defined from v{first_version_defining(seg_id)})",
                    location)


# -- strict: fields of the segments the version defines -------------------------------------


def _check_fields(message: Message, defs: Definitions, budget: int) -> list[_Found]:
    """Field errors of every segment `defs` defines, stopping once `budget` are found."""
    found: list[_Found] = []
    if budget <= 0:
        return found
    for segment in message.segments():
        definition = defs.segments.get(segment.id)
        if definition is None or segment.field(0) != segment.id:
            continue  # unknown ids were reported by _check_segment_ids
        for error in _segment_errors(segment, definition, defs.tables, message.delimiters):
            found.append(_Found(segment.index, error))
            if len(found) >= budget:
                return found
    return found


def _segment_errors(segment: Segment, definition: SegmentDef, tables: Mapping[str, Table],
                    delimiters: Delimiters) -> Iterator[Hl7Error]:
    header = segment.id in HEADER_SEGMENTS
    for field in definition.fields:
        # MSH-1/MSH-2 are the delimiters themselves, already checked by the parser.
        if field.withdrawn or (header and field.number <= 2):
            continue
        value = segment.field(field.number)
        if not value:
            if field.required:
                yield Hl7Error(ErrorCode.REQUIRED_FIELD_MISSING,
                               f"required field {_human(field)} is empty",
                               _at(segment, field))
            continue
        if value == _HL7_NULL:
            continue
        yield from _field_errors(segment, field, value, tables, delimiters)


def _field_errors(segment: Segment, field: FieldDef, value: str,
                  tables: Mapping[str, Table], delimiters: Delimiters) -> Iterator[Hl7Error]:
    repetitions = value.split(delimiters.repetition)
    limit = field.max_repetitions
    if limit is not None and len(repetitions) > limit:
        yield Hl7Error(ErrorCode.DATA_TYPE_ERROR,
                       f"{_human(field)} has {len(repetitions)} repetitions, at most {limit} "
                       "allowed",
                       _at(segment, field, repetition=limit + 1))
    check = _FORMATS.get(field.datatype)
    table = tables.get(field.table) if field.table and field.datatype in ("ID", "IS") else None
    for number, repetition in enumerate(repetitions, start=1):
        if not repetition or repetition == _HL7_NULL:
            continue
        if check is not None:
            yield from _format_errors(segment, field, number, repetition, check, delimiters)
        if table is not None:
            code = repetition.split(delimiters.component, 1)[0]
            if code and code not in table.values:
                yield Hl7Error(ErrorCode.TABLE_VALUE_NOT_FOUND,
                               f"value not in HL7 table {table.number} ({table.name})",
                               _at(segment, field, repetition=number))


def _format_errors(segment: Segment, field: FieldDef, number: int, repetition: str,
                   check: _Format, delimiters: Delimiters) -> Iterator[Hl7Error]:
    # TS is a composite whose first component is the DTM; the rest is a primitive as a whole.
    component = 1 if field.datatype == "TS" else None
    text = repetition.split(delimiters.component, 1)[0] if component else repetition
    if text and not check.valid(text):
        yield Hl7Error(ErrorCode.DATA_TYPE_ERROR,
                       f"{_human(field)} is not a valid {field.datatype} "
                       f"(expected {check.expected})",
                       _at(segment, field, repetition=number, component=component))


def _at(segment: Segment, field: FieldDef, repetition: int | None = None,
        component: int | None = None) -> Location:
    return Location(segment.id, segment.occurrence, field.number, component, repetition)


def _human(field: FieldDef) -> str:
    return "'" + field.long_name.lower().replace("_", " ") + "'"


# -- primitive formats -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Format:
    """A primitive data type's syntax check and how a reason describes it."""

    valid: Callable[[str], bool]
    expected: str


_NM = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_SI = re.compile(r"\d{1,4}")
_DATE = r"(\d{4})(?:(\d{2})(?:(\d{2})"
_TIME = r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{1,4})?)?)?"
_ZONE = r"(?:[+-](\d{2})(\d{2}))?"
_DT = re.compile(_DATE + ")?)?")
_DTM = re.compile(_DATE + "(?:" + _TIME + ")?)?)?" + _ZONE)
_TM = re.compile(_TIME + _ZONE)


def _valid_date(year: str, month: str | None, day: str | None) -> bool:
    if month is None:
        return True
    if not 1 <= int(month) <= 12:
        return False
    return day is None or 1 <= int(day) <= calendar.monthrange(int(year), int(month))[1]


def _valid_time(hour: str | None, minute: str | None, second: str | None) -> bool:
    return ((hour is None or int(hour) <= 23) and (minute is None or int(minute) <= 59)
            and (second is None or int(second) <= 59))


def _valid_zone(hours: str | None, minutes: str | None) -> bool:
    return hours is None or (int(hours) <= 23 and int(minutes or 0) <= 59)


def _is_dt(text: str) -> bool:
    match = _DT.fullmatch(text)
    return match is not None and _valid_date(*match.groups())


def _is_dtm(text: str) -> bool:
    match = _DTM.fullmatch(text)
    if match is None:
        return False
    year, month, day, hour, minute, second, zone_h, zone_m = match.groups()
    return (_valid_date(year, month, day) and _valid_time(hour, minute, second)
            and _valid_zone(zone_h, zone_m))


def _is_tm(text: str) -> bool:
    match = _TM.fullmatch(text)
    if match is None:
        return False
    hour, minute, second, zone_h, zone_m = match.groups()
    return _valid_time(hour, minute, second) and _valid_zone(zone_h, zone_m)


_DTM_FORMAT = _Format(_is_dtm, "YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]")
_FORMATS: Mapping[str, _Format] = {
    "NM": _Format(lambda text: _NM.fullmatch(text) is not None, "[+|-]digits[.digits]"),
    "SI": _Format(lambda text: _SI.fullmatch(text) is not None, "1 to 4 digits"),
    "DT": _Format(_is_dt, "YYYY[MM[DD]]"),
    "DTM": _DTM_FORMAT,
    "TS": _DTM_FORMAT,
    "TM": _Format(_is_tm, "HH[MM[SS[.S[S[S[S]]]]]][+/-ZZZZ]"),
}
