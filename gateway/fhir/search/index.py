"""FHIR search indexing: the values a parameter's path reaches in a resource, turned into
the store's index rows (the emitter for each leaf type is chosen once, when the table is
compiled), and the judging of a match against those rows in memory.

Indexing runs on every write, so it reads plain JSON dicts and never raises: a value that
cannot be indexed is skipped. Dates become the UTC range their precision covers.
"""

from __future__ import annotations

import calendar
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from gateway.store.fhir import (
    DateIndex,
    IdMatch,
    IndexEntry,
    Match,
    MissingMatch,
    QuantityIndex,
    ReferenceIndex,
    ReferenceMatch,
    StringIndex,
    StringMatch,
    TokenIndex,
    TokenMatch,
)

MIN_INSTANT = "0001-01-01T00:00:00.000000Z"
MAX_INSTANT = "9999-12-31T23:59:59.999999Z"

# FHIR R4 §2.24.0.1 id; a reference tail is Type/id, optionally /_history/version.
_REFERENCE = re.compile(
    r"(?:[A-Za-z][A-Za-z0-9+.\-]*://\S*/)?([A-Z][A-Za-z]{0,63})/([A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?")
_DATE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?")
# Telephone punctuation dropped so '(555) 010-0199' finds '555-010-0199' and '5550100199'.
_PHONE_PUNCTUATION = str.maketrans("", "", " -.()\t")

_TOKEN_TYPES = frozenset({"Identifier", "CodeableConcept", "Coding", "ContactPoint", "code",
                          "string", "id", "uri", "boolean", "canonical", "oid", "uuid"})
_STRING_TYPES = frozenset({"HumanName", "Address", "string", "markdown"})
_DATE_TYPES = frozenset({"date", "dateTime", "instant", "Period"})
_QUANTITY_TYPES = frozenset({"Quantity", "Age", "Duration", "Distance", "Count",
                             "SimpleQuantity", "Money"})
_HUMAN_NAME_PARTS = ("family", "given", "prefix", "suffix", "text")
_ADDRESS_PARTS = ("line", "city", "district", "state", "postalCode", "country", "text")

Emit = Callable[[str, Any, list[IndexEntry]], None]


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a parameter's path, with its optional filter on a child's value."""

    name: str
    filter: tuple[str, str] | None  # telecom[system=phone]: keep repetitions with system=phone


@dataclass(frozen=True, slots=True)
class IndexPath:
    """One alternative path of a parameter and the emitter of its leaf type."""

    steps: tuple[Step, ...]
    emit: Emit


# -- extraction -----------------------------------------------------------------------------


def values(resource: dict[str, Any], steps: tuple[Step, ...]) -> list[Any]:
    """The values at a path, repeating elements flattened; wrong shapes yield nothing."""
    current: list[Any] = [resource]
    for step in steps:
        found: list[Any] = []
        for node in current:
            if not isinstance(node, dict):
                continue
            value = node.get(step.name)
            if isinstance(value, list):
                found.extend(value)
            elif value is not None:
                found.append(value)
        if step.filter is not None:
            key, want = step.filter
            found = [v for v in found if isinstance(v, dict) and v.get(key) == want]
        if not found:
            return found
        current = found
    return current


def normalize(text: str) -> str:
    """String search form: case-folded, accents removed (NFKD), whitespace collapsed."""
    folded = text.casefold()
    if not folded.isascii():
        folded = "".join(c for c in unicodedata.normalize("NFKD", folded)
                         if not unicodedata.combining(c))
    return " ".join(folded.split())


def normalize_contact(value: str) -> str:
    """ContactPoint token form: an email lower-cased, a phone number without punctuation."""
    if "@" in value:
        return value.strip().lower()
    return value.translate(_PHONE_PUNCTUATION)


def _token_identifier(param: str, value: Any, out: list[IndexEntry]) -> None:
    if isinstance(value, dict):
        code, system = value.get("value"), value.get("system")
        if isinstance(code, str) and code:
            out.append(TokenIndex(param, system if isinstance(system, str) else None, code))


def _token_coding(param: str, value: Any, out: list[IndexEntry]) -> None:
    if isinstance(value, dict):
        code, system = value.get("code"), value.get("system")
        if isinstance(code, str) and code:
            out.append(TokenIndex(param, system if isinstance(system, str) else None, code))


def _token_concept(param: str, value: Any, out: list[IndexEntry]) -> None:
    if isinstance(value, dict):
        codings = value.get("coding")
        if isinstance(codings, list):
            for coding in codings:
                _token_coding(param, coding, out)


def _token_contact(param: str, value: Any, out: list[IndexEntry]) -> None:
    if isinstance(value, dict):
        text = value.get("value")
        if isinstance(text, str):
            code = normalize_contact(text)
            if code:
                out.append(TokenIndex(param, None, code))


def _token_primitive(param: str, value: Any, out: list[IndexEntry]) -> None:
    if isinstance(value, bool):
        out.append(TokenIndex(param, None, "true" if value else "false"))
    elif isinstance(value, str) and value:
        out.append(TokenIndex(param, None, value))


def _string_primitive(param: str, value: Any, out: list[IndexEntry]) -> None:
    if isinstance(value, str):
        normalized = normalize(value)
        if normalized:
            out.append(StringIndex(param, normalized, value))


def _string_parts(param: str, value: Any, parts: tuple[str, ...],
                  out: list[IndexEntry]) -> None:
    if not isinstance(value, dict):
        return
    for part in parts:
        text = value.get(part)
        for item in text if isinstance(text, list) else (text,):
            _string_primitive(param, item, out)


def _string_name(param: str, value: Any, out: list[IndexEntry]) -> None:
    _string_parts(param, value, _HUMAN_NAME_PARTS, out)


def _string_address(param: str, value: Any, out: list[IndexEntry]) -> None:
    _string_parts(param, value, _ADDRESS_PARTS, out)


def _date_primitive(param: str, value: Any, out: list[IndexEntry]) -> None:
    if isinstance(value, str):
        span = date_range(value)
        if span is not None:
            out.append(DateIndex(param, *span))


def _date_period(param: str, value: Any, out: list[IndexEntry]) -> None:
    if not isinstance(value, dict):
        return
    start, end = value.get("start"), value.get("end")
    if start is None and end is None:
        return
    low, high = MIN_INSTANT, MAX_INSTANT
    if start is not None:
        span = date_range(start) if isinstance(start, str) else None
        if span is None:
            return
        low = span[0]
    if end is not None:
        span = date_range(end) if isinstance(end, str) else None
        if span is None:
            return
        high = span[1]
    out.append(DateIndex(param, low, high))


def _quantity(param: str, value: Any, out: list[IndexEntry]) -> None:
    if not isinstance(value, dict):
        return
    number = value.get("value")
    if isinstance(number, bool) or not isinstance(number, int | float | Decimal):
        return
    number = float(number)
    if not math.isfinite(number):
        return
    system, code, unit = value.get("system"), value.get("code"), value.get("unit")
    system = system if isinstance(system, str) and system else None
    code = code if isinstance(code, str) and code else None
    out.append(QuantityIndex(param, number, system, code))
    # R4 §3.1.1.4.6: `value||unit` matches the code or the unit, so the unit gets a row too.
    if isinstance(unit, str) and unit and unit != code:
        out.append(QuantityIndex(param, number, None, unit))


def _reference_emitter(targets: frozenset[str]) -> Emit:
    def emit(param: str, value: Any, out: list[IndexEntry]) -> None:
        if isinstance(value, dict):
            text = value.get("reference")
            if isinstance(text, str):
                target = reference_target(text)
                if target is not None and target.partition("/")[0] in targets:
                    out.append(ReferenceIndex(param, target))
    return emit


def emitter(kind: str, leaf: str, path: str, targets: tuple[str, ...]) -> Emit:
    """The index-row emitter of a parameter of `kind` whose path ends in a `leaf`;
    ValueError if that parameter type cannot read that FHIR type."""
    allowed = {"token": _TOKEN_TYPES, "string": _STRING_TYPES, "date": _DATE_TYPES,
               "reference": frozenset({"Reference"}), "quantity": _QUANTITY_TYPES}[kind]
    if leaf not in allowed:
        raise ValueError(f"'{path}' is a {leaf}; a {kind} parameter reads "
                         + ", ".join(sorted(allowed)))
    if kind == "token":
        return {"Identifier": _token_identifier, "CodeableConcept": _token_concept,
                "Coding": _token_coding, "ContactPoint": _token_contact}.get(
                    leaf, _token_primitive)
    if kind == "string":
        return {"HumanName": _string_name, "Address": _string_address}.get(
            leaf, _string_primitive)
    if kind == "date":
        return _date_period if leaf == "Period" else _date_primitive
    if kind == "quantity":
        return _quantity
    return _reference_emitter(frozenset(targets))


def reference_target(reference: str) -> str | None:
    """'Type/id' from a relative or absolute reference (version dropped); None for
    'urn:uuid:', '#contained' and anything else that is not a resource URL."""
    match = _REFERENCE.fullmatch(reference)
    if match is None:
        return None
    return f"{match.group(1)}/{match.group(2)}"


def date_range(text: str) -> tuple[str, str] | None:
    """The UTC instants [low, high] a date, dateTime or instant covers at its precision;
    None if it is not one. A time without an offset is taken as UTC."""
    match = _DATE.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        y = int(year)
        if month is None:
            low = datetime(y, 1, 1)
            high = datetime(y, 12, 31, 23, 59, 59, 999999)
        elif day is None:
            low = datetime(y, int(month), 1)
            last = calendar.monthrange(y, low.month)[1]
            high = datetime(y, low.month, last, 23, 59, 59, 999999)
        elif hour is None:
            low = datetime(y, int(month), int(day))
            high = low.replace(hour=23, minute=59, second=59, microsecond=999999)
        else:
            low = datetime(y, int(month), int(day), int(hour), int(minute),
                           int(second or 0))
            if second is None:
                high = low.replace(second=59, microsecond=999999)
            elif fraction is None:
                high = low.replace(microsecond=999999)
            else:
                digits = fraction[:6]
                low = low.replace(microsecond=int(digits.ljust(6, "0")))
                high = low.replace(microsecond=int(digits.ljust(6, "9")))
    except ValueError:
        return None
    if zone is not None and zone != "Z":
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            return None
        offset = timedelta(hours=hours, minutes=minutes)
        if zone[0] == "+":
            offset = -offset
        return _instant(_shift(low, offset)), _instant(_shift(high, offset))
    return _instant(low), _instant(high)


def _shift(moment: datetime, offset: timedelta) -> datetime:
    try:
        return moment + offset
    except OverflowError:  # an offset across year 1 or 9999: the range is open there
        return datetime.min if offset < timedelta(0) else datetime.max


def _instant(moment: datetime) -> str:
    # Formatted by hand: strftime('%Y') does not pad years before 1000 on every platform.
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
            f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond:06d}Z")


# -- judging a resource not yet stored --------------------------------------------------------


def judge(match: Match, resource: dict[str, Any],
          entries: Sequence[IndexEntry]) -> bool | None:
    """One match against a resource's index rows (the store's semantics, in memory)."""
    if isinstance(match, IdMatch):
        return resource.get("id") == match.id
    if isinstance(match, TokenMatch):
        found = any(isinstance(e, TokenIndex) and e.param == match.param
                    and (match.code is None or e.code == match.code)
                    and (match.system is None or (e.system or "") == match.system)
                    for e in entries)
        return found != match.negate
    if isinstance(match, ReferenceMatch):
        return any(isinstance(e, ReferenceIndex) and e.param == match.param
                   and e.target == match.target for e in entries)
    if isinstance(match, StringMatch):
        strings = [e for e in entries if isinstance(e, StringIndex) and e.param == match.param]
        if match.mode == "exact":
            return any(e.exact == match.value for e in strings)
        if match.mode == "contains":
            return any(match.value in e.normalized for e in strings)
        return any(e.normalized.startswith(match.value) for e in strings)
    if isinstance(match, MissingMatch):
        return match.missing != any(getattr(e, "param", None) == match.param for e in entries)
    return None
