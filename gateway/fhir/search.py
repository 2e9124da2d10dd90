"""FHIR R4 search: the parameter table, the indexer the store runs on every write, and the
parsing of a search request into the store's `SearchQuery`.

The parameters are rows of `mappings/search-parameters.csv`, checked against the R4 model
and compiled once into per-type extractors, so indexing and parsing stay cheap. Errors name
the parameter and the rule, never a value: search values are PHI.
"""

from __future__ import annotations

import calendar
import csv
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast, get_args

from fhir.resources.R4B import get_fhir_model_class

from gateway.fhir.model import UnknownElement, element, is_resource_type
from gateway.store.fhir import (
    Clause,
    DateIndex,
    DateMatch,
    IdMatch,
    IndexEntry,
    LastUpdatedMatch,
    Match,
    MissingMatch,
    Prefix,
    QuantityIndex,
    QuantityMatch,
    ReferenceIndex,
    ReferenceMatch,
    SearchQuery,
    SortKey,
    StringIndex,
    StringMatch,
    TokenIndex,
    TokenMatch,
)

# The table's file name in the mappings directory; the composition passes
# `gateway.mapping.tables.SHIPPED / TABLE` (a codec may not import the mapping layer).
TABLE = "search-parameters.csv"
COLUMNS = ("resource", "name", "type", "path", "targets", "compartment")

ParamType = Literal["token", "string", "date", "reference", "quantity"]
PARAM_TYPES: tuple[str, ...] = get_args(ParamType)
PREFIXES: frozenset[str] = frozenset(get_args(Prefix))

MIN_INSTANT = "0001-01-01T00:00:00.000000Z"
MAX_INSTANT = "9999-12-31T23:59:59.999999Z"
MAX_VALUES = 100  # comma-separated values in one parameter: bounds the store's OR clause

# FHIR R4 §2.24.0.1 id; a reference tail is Type/id, optionally /_history/version.
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_REFERENCE = re.compile(
    r"(?:[A-Za-z][A-Za-z0-9+.\-]*://\S*/)?([A-Z][A-Za-z]{0,63})/([A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?")
_DATE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_ESCAPE = re.compile(r"\\([\\,|$])")
_PARAM_NAME = re.compile(r"[a-z][a-z0-9\-]*")
_SHOWN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.]{0,63}")
_STEP = re.compile(r"([A-Za-z][A-Za-z0-9]*)(?:\[([A-Za-z][A-Za-z0-9]*)=([^\]]+)\])?")
_DIGITS = re.compile(r"\d{1,9}")
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

_MODIFIERS: dict[str, frozenset[str]] = {
    "token": frozenset({"", "not", "missing"}),
    "string": frozenset({"", "exact", "contains", "missing"}),
    "date": frozenset({"", "missing"}),
    "reference": frozenset({"", "missing"}),  # plus a target type, e.g. subject:Patient
    "quantity": frozenset({"", "missing"}),
}
_JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json",
                           "application/json+fhir"})
_SINGLE = frozenset({"_count", "_offset", "_sort", "_elements", "_summary", "_total",
                     "_format"})


# -- errors ---------------------------------------------------------------------------------


class SearchTableError(ValueError):
    """A row of the search parameter table that cannot be used: file, line and reason."""

    def __init__(self, file: Path | str, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}")
        self.file = str(file)
        self.line = line
        self.reason = reason


class SearchError(ValueError):
    """A search the gateway refuses (HTTP `status`): names the parameter and the rule, never
    the value."""

    status = 400

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


class UnsupportedFormat(SearchError):
    """_format asks for something other than JSON: the edge answers 415."""

    status = 415


# -- the table ------------------------------------------------------------------------------

_Emit = Callable[[str, Any, list[IndexEntry]], None]


@dataclass(frozen=True, slots=True)
class _Step:
    name: str
    filter: tuple[str, str] | None  # telecom[system=phone]: keep repetitions with system=phone


@dataclass(frozen=True, slots=True)
class _Path:
    steps: tuple[_Step, ...]
    emit: _Emit


@dataclass(frozen=True, slots=True)
class SearchParameter:
    """One row of the table: a parameter of one resource type, compiled."""

    resource: str
    name: str
    type: ParamType
    path: str  # as written in the table, e.g. 'effectiveDateTime|effectivePeriod'
    targets: tuple[str, ...]  # reference target types
    compartment: bool  # places the resource in the Patient compartment
    roots: frozenset[str]  # the top-level elements the parameter reads
    contact: bool = False  # reads ContactPoint values: normalise search values alike
    paths: tuple[_Path, ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Include:
    """_include (source_type is the searched type) or _revinclude (target_type is)."""

    source_type: str
    param: str
    target_type: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedSearch:
    """A search request as the store and the edge need it. `params`: the search parameters
    filtered or sorted on (no modifiers), for policy checks; `shape`: the query with every
    value replaced by '*', for the audit log."""

    query: SearchQuery
    includes: tuple[Include, ...] = ()
    revincludes: tuple[Include, ...] = ()
    elements: tuple[str, ...] | None = None
    summary_count: bool = False
    total: bool = False
    params: frozenset[str] = frozenset()
    shape: str = ""


class SearchRegistry:
    """The search parameters of every resource type the store serves."""

    def __init__(self, parameters: Iterable[SearchParameter]) -> None:
        by_type: dict[str, dict[str, SearchParameter]] = {}
        for p in parameters:
            by_type.setdefault(p.resource, {})[p.name] = p
        self._by_type = {t: MappingProxyType(ps) for t, ps in by_type.items()}
        self._elements = {t: _top_level_elements(t) for t in by_type}
        self._compartment = {t: tuple(n for n, p in ps.items() if p.compartment)
                             for t, ps in by_type.items()}

    @classmethod
    def load(cls, path: Path) -> SearchRegistry:
        """Read and check the table; SearchTableError names the file and line of a bad row."""
        return cls(_read_table(path))

    def types(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_type))

    def params(self, resource_type: str) -> Mapping[str, SearchParameter]:
        """name -> definition (empty for a type the table does not list)."""
        return self._by_type.get(resource_type, MappingProxyType({}))

    def compartment_params(self, resource_type: str) -> tuple[str, ...]:
        """Reference parameters placing a resource in the Patient compartment (Patient
        itself: none; use _id)."""
        return self._compartment.get(resource_type, ())

    def element_roots(self, resource_type: str, param: str) -> frozenset[str]:
        """The top-level elements a parameter reads; KeyError for an unknown parameter."""
        if param == "_id":
            return frozenset({"id"})
        if param == "_lastUpdated":
            return frozenset({"meta"})
        return self._by_type[resource_type][param].roots

    # -- indexing (every write) -------------------------------------------------------------

    def index(self, resource_type: str, resource: dict[str, Any]) -> list[IndexEntry]:
        """The index rows of a resource; what cannot be indexed is skipped, never raised."""
        params = self._by_type.get(resource_type)
        if params is None or not isinstance(resource, dict):
            return []
        out: list[IndexEntry] = []
        for name, param in params.items():
            for path in param.paths:
                for value in _values(resource, path.steps):
                    path.emit(name, value, out)
        return list(dict.fromkeys(out))

    def patients(self, resource_type: str, resource: dict[str, Any]) -> set[str]:
        """The patients ('Patient/id') whose compartment holds this resource: only the
        compartment parameters are read (every read of a confined token asks this)."""
        if resource_type == "Patient":
            return {f"Patient/{resource.get('id')}"} if isinstance(resource, dict) else set()
        params = self._by_type.get(resource_type)
        if params is None or not isinstance(resource, dict):
            return set()
        out: list[IndexEntry] = []
        for name in self._compartment.get(resource_type, ()):
            for path in params[name].paths:
                for value in _values(resource, path.steps):
                    path.emit(name, value, out)
        return {entry.target for entry in out if isinstance(entry, ReferenceIndex)
                and entry.target.startswith("Patient/")}

    def matches(self, resource_type: str, resource: dict[str, Any],
                clauses: Sequence[Clause]) -> bool | None:
        """Whether a resource (not yet stored) meets these clauses, judged on its index rows
        as the store would; None when a clause uses a match this cannot judge in memory
        (dates, quantities, _lastUpdated), so the caller refuses rather than guesses."""
        entries = self.index(resource_type, resource)
        for clause in clauses:
            verdicts = [_judge(match, resource, entries) for match in clause]
            if None in verdicts:
                return None
            if not any(verdicts):
                return False
        return True

    # -- parsing (every search) -------------------------------------------------------------

    def parse(self, resource_type: str, params: Sequence[tuple[str, str]], *,
              default_count: int, max_count: int, lenient: bool = False) -> ParsedSearch:
        """The query parameters as a store query and result options; SearchError (400) or
        UnsupportedFormat (415). lenient ignores unknown parameters, not malformed values."""
        defs = self._by_type.get(resource_type)
        if defs is None:
            raise SearchError("_type", "this resource type is not searchable here")
        request = _Request(self, resource_type, defs, max_count)
        for raw_name, value in params:
            request.add(raw_name, value, lenient)
        return request.result(default_count)


def _judge(match: Match, resource: dict[str, Any],
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


# -- reading the table ----------------------------------------------------------------------


def _read_table(path: Path) -> list[SearchParameter]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SearchTableError(path, 0, f"cannot be read: {exc}") from None
    reader = csv.reader(text.splitlines(keepends=True))
    header = [h.strip() for h in next(reader, [])]
    if sorted(header) != sorted(COLUMNS):
        raise SearchTableError(path, 1, "header must be " + ",".join(COLUMNS))
    seen: set[tuple[str, str]] = set()
    parameters: list[SearchParameter] = []
    for cells in reader:
        line = reader.line_num
        if not cells or all(not c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        if len(cells) != len(header):
            raise SearchTableError(path, line, f"has {len(cells)} cells; the header has "
                                               f"{len(header)}")
        row = {h: c.strip() for h, c in zip(header, cells, strict=True)}
        try:
            param = _compile(row)
        except (ValueError, UnknownElement) as exc:
            raise SearchTableError(path, line, str(exc)) from None
        if (param.resource, param.name) in seen:
            raise SearchTableError(path, line, f"{param.resource} {param.name} is defined "
                                               "twice")
        seen.add((param.resource, param.name))
        parameters.append(param)
    return parameters


def _compile(row: dict[str, str]) -> SearchParameter:
    resource, name, kind = row["resource"], row["name"], row["type"]
    if not is_resource_type(resource):
        raise ValueError(f"resource '{resource}' is not a FHIR R4 resource type")
    if name in ("_id", "_lastUpdated"):
        raise ValueError(f"{name} is built in; it needs no row")
    if not _PARAM_NAME.fullmatch(name):
        raise ValueError(f"name '{name}': lower-case letters, digits and '-'")
    if kind not in PARAM_TYPES:
        raise ValueError(f"type '{kind}' is not one of {'|'.join(PARAM_TYPES)}")
    targets = tuple(t for t in row["targets"].split("|") if t)
    if kind == "reference" and not targets:
        raise ValueError("a reference parameter lists its target types")
    if kind != "reference" and targets:
        raise ValueError("targets are for reference parameters only")
    if row["compartment"] not in ("", "0", "1"):
        raise ValueError("compartment is 1, 0 or empty")
    compartment = row["compartment"] == "1"
    if compartment and "Patient" not in targets:
        raise ValueError("only a reference that may point to a Patient places a resource in "
                         "the Patient compartment")
    if not row["path"]:
        raise ValueError("path is empty")
    paths: list[_Path] = []
    leaf_types: set[str] = set()
    for alternative in row["path"].split("|"):
        steps = _steps(resource, alternative)
        leaf = element(resource, ".".join(s.name for s in steps))
        leaf_types.add(leaf.type)
        for target in targets:
            if leaf.reference_targets and target not in leaf.reference_targets:
                raise ValueError(f"{resource}.{alternative} cannot refer to a {target}")
        paths.append(_Path(steps, _emitter(kind, leaf.type, alternative, targets)))
    return SearchParameter(
        resource=resource, name=name, type=cast(ParamType, kind),
        path=row["path"], targets=targets, compartment=compartment,
        roots=frozenset(p.steps[0].name for p in paths),
        contact=leaf_types == {"ContactPoint"}, paths=tuple(paths))


def _steps(resource: str, path: str) -> tuple[_Step, ...]:
    steps: list[_Step] = []
    for text in path.split("."):
        match = _STEP.fullmatch(text)
        if match is None:
            raise ValueError(f"'{text}' in path '{path}' is not an element name or "
                             "element[child=value]")
        name, key, want = match.groups()
        steps.append(_Step(name, (key, want) if key else None))
        if key:  # the filtering child must exist on the element
            element(resource, ".".join([*(s.name for s in steps), key]))
    return tuple(steps)


def _emitter(kind: str, leaf: str, path: str, targets: tuple[str, ...]) -> _Emit:
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


def _top_level_elements(resource_type: str) -> dict[str, tuple[str, ...]]:
    """Element name -> JSON names for _elements; a choice base (`effective`) names every
    form (`effectiveDateTime`, `effectivePeriod`, ...)."""
    names: dict[str, tuple[str, ...]] = {}
    model = get_fhir_model_class(resource_type)
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if name.endswith("__ext") or extra.get("element_property") is not True:
            continue
        json_name = info.alias or name
        names[json_name] = (json_name,)
        base = extra.get("one_of_many")
        if isinstance(base, str):
            names[base] = (*names.get(base, ()), json_name)
    return names


# -- extraction -----------------------------------------------------------------------------


def _values(resource: dict[str, Any], steps: tuple[_Step, ...]) -> list[Any]:
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


def _reference_emitter(targets: frozenset[str]) -> _Emit:
    def emit(param: str, value: Any, out: list[IndexEntry]) -> None:
        if isinstance(value, dict):
            text = value.get("reference")
            if isinstance(text, str):
                target = reference_target(text)
                if target is not None and target.partition("/")[0] in targets:
                    out.append(ReferenceIndex(param, target))
    return emit


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


# -- parsing --------------------------------------------------------------------------------


def _split(text: str, separator: str) -> list[str]:
    """Split on separators not escaped with '\\' (R4 §3.1.1.1.8); escapes are kept."""
    if "\\" not in text:
        return text.split(separator)
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            current.append(text[i:i + 2])
            i += 2
            continue
        if char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return _ESCAPE.sub(r"\1", text) if "\\" in text else text


def _shown(name: str) -> str:
    """A parameter name fit for an error message (a name, never a value in disguise)."""
    return name if _SHOWN_NAME.fullmatch(name) else "(parameter)"


class _Request:
    """The state of one parse: clauses and options gathered parameter by parameter."""

    def __init__(self, registry: SearchRegistry, resource_type: str,
                 defs: Mapping[str, SearchParameter], max_count: int) -> None:
        self.registry = registry
        self.resource_type = resource_type
        self.defs = defs
        self.max_count = max_count
        self.clauses: list[Clause] = []
        self.sort: tuple[SortKey, ...] = ()
        self.count: int | None = None
        self.offset = 0
        self.includes: dict[Include, None] = {}
        self.revincludes: dict[Include, None] = {}
        self.elements: tuple[str, ...] | None = None
        self.summary_count = False
        self.total = False
        self.used: set[str] = set()
        self.shape: list[str] = []
        self.seen: set[str] = set()

    def result(self, default_count: int) -> ParsedSearch:
        count = min(default_count, self.max_count) if self.count is None else self.count
        if self.summary_count:
            count = 0
        query = SearchQuery(self.resource_type, tuple(self.clauses), self.sort, count,
                            self.offset)
        return ParsedSearch(query, tuple(self.includes), tuple(self.revincludes),
                            self.elements, self.summary_count,
                            self.total or self.summary_count, frozenset(self.used),
                            "&".join(self.shape))

    def add(self, raw_name: str, value: str, lenient: bool) -> None:
        name, _, modifier = raw_name.partition(":")
        if "." in name or name == "_has":
            raise SearchError(_shown(name), "chained and reverse-chained parameters are "
                                            "not supported")
        if name in _CONTROL or name in ("_id", "_lastUpdated"):
            if modifier:
                raise SearchError(_shown(name), "takes no modifier")
            if name in _SINGLE:
                if name in self.seen:
                    raise SearchError(name, "may be given only once")
                self.seen.add(name)
            self.shape.append(f"{name}=*")
            if value == "":  # R4 §3.1.1.1: an empty parameter is ignored
                return
            if name == "_id":
                self.used.add(name)
                self.clauses.append(tuple(self._ids(value)))
            elif name == "_lastUpdated":
                self.used.add(name)
                self.clauses.append(tuple(LastUpdatedMatch(*self._date(name, v))
                                          for v in self._items(name, value)))
            else:
                _CONTROL[name](self, value)
            return
        param = self.defs.get(name)
        if param is None:
            if lenient:
                self.shape.append("(unknown)=*")
                return
            raise SearchError(_shown(name), f"not a search parameter of {self.resource_type}")
        self._check_modifier(param, modifier)
        self.shape.append(f"{raw_name}=*")
        if value == "":
            return
        self.used.add(name)
        if modifier == "missing":
            if value not in ("true", "false"):
                raise SearchError(f"{name}:missing", "must be true or false")
            self.clauses.append((MissingMatch(name, value == "true"),))
            return
        items = self._items(name, value)
        if modifier == "not" and len(items) > 1:
            raise SearchError(f"{name}:not", "takes one value; repeat the parameter to "
                                             "exclude several")
        matches = [m for item in items for m in self._matches(param, modifier, item)]
        if matches:
            self.clauses.append(tuple(matches))

    def _items(self, name: str, value: str) -> list[str]:
        items = [v for v in _split(value, ",") if v]
        if len(items) > MAX_VALUES:
            raise SearchError(name, f"at most {MAX_VALUES} comma-separated values")
        return items

    def _check_modifier(self, param: SearchParameter, modifier: str) -> None:
        if modifier in _MODIFIERS[param.type]:
            return
        if param.type == "reference" and modifier in param.targets:
            return
        rule = ", ".join(f":{m}" for m in sorted(_MODIFIERS[param.type]) if m)
        if param.type == "reference":
            rule += " or a target type (" + ", ".join(param.targets) + ")"
        raise SearchError(param.name, f"modifier not supported; use {rule}")

    def _matches(self, param: SearchParameter, modifier: str, item: str) -> list[Match]:
        name = param.name
        if param.type == "token":
            system, code = self._token(name, item)
            if param.contact and code is not None:
                code = normalize_contact(code)
            return [TokenMatch(name, system, code, negate=modifier == "not")]
        if param.type == "string":
            text = _unescape(item)
            if modifier == "exact":
                return [StringMatch(name, text, "exact")]
            normalized = normalize(text)
            if not normalized:
                return []
            return [StringMatch(name, normalized, "contains" if modifier else "start")]
        if param.type == "date":
            return [DateMatch(name, *self._date(name, item))]
        if param.type == "quantity":
            return [self._quantity(name, item)]
        return [ReferenceMatch(name, t) for t in self._references(param, modifier, item)]

    def _token(self, name: str, item: str) -> tuple[str | None, str | None]:
        parts = _split(item, "|")
        if len(parts) == 1:
            return None, _unescape(parts[0])
        if len(parts) > 2 or parts == ["", ""]:
            raise SearchError(name, "not a valid token; use code, system|code, |code or "
                                    "system|")
        return _unescape(parts[0]), _unescape(parts[1]) or None

    def _date(self, name: str, item: str) -> tuple[Prefix, str, str]:
        prefix: Prefix = "eq"
        if item[:2] in PREFIXES:
            prefix, item = cast(Prefix, item[:2]), item[2:]
        # A '+' offset left unencoded in a URL arrives as a space.
        span = date_range(item.replace(" ", "+"))
        if span is None:
            raise SearchError(name, "not a valid date; use YYYY, YYYY-MM, YYYY-MM-DD or a "
                                    "dateTime, optionally after a prefix such as ge or lt")
        return prefix, span[0], span[1]

    def _quantity(self, name: str, item: str) -> QuantityMatch:
        prefix: Prefix = "eq"
        if item[:2] in PREFIXES:
            prefix, item = cast(Prefix, item[:2]), item[2:]
        parts = _split(item, "|")
        if len(parts) not in (1, 3) or not _NUMBER.fullmatch(parts[0]):
            raise SearchError(name, "not a valid quantity; use [prefix]number or "
                                    "[prefix]number|system|code")
        number = float(parts[0])
        if not math.isfinite(number):
            raise SearchError(name, "not a finite number")
        if len(parts) == 1:
            return QuantityMatch(name, prefix, number)
        system, code = _unescape(parts[1]) or None, _unescape(parts[2]) or None
        return QuantityMatch(name, prefix, number, system, code)

    def _references(self, param: SearchParameter, modifier: str, item: str) -> list[str]:
        text = _unescape(item)
        if _ID.fullmatch(text):
            types = (modifier,) if modifier else param.targets
            return [f"{t}/{text}" for t in types]
        target = reference_target(text)
        if target is None:
            raise SearchError(param.name, "not a valid reference; use Type/id, an id or an "
                                          "absolute URL ending in Type/id")
        kind = target.partition("/")[0]
        if kind not in param.targets or (modifier and kind != modifier):
            raise SearchError(param.name, "refers to a type this parameter does not; "
                                          "targets: " + ", ".join(param.targets))
        return [target]

    def _ids(self, value: str) -> list[Match]:
        items = self._items("_id", value)
        if not all(_ID.fullmatch(i) for i in items):
            raise SearchError("_id", "not a valid id (1-64 of A-Z a-z 0-9 - .)")
        return [IdMatch(i) for i in items]

    # -- result parameters ------------------------------------------------------------------

    def count_(self, value: str) -> None:
        if not value.isdigit() or not value.isascii():
            raise SearchError("_count", f"must be a whole number from 0 to {self.max_count}")
        # Above the maximum is clamped (R4 §3.1.1.5.4: the server may return fewer).
        self.count = self.max_count if len(value) > 9 else min(int(value), self.max_count)

    def offset_(self, value: str) -> None:
        if not _DIGITS.fullmatch(value):
            raise SearchError("_offset", "must be a whole number from 0 to 999999999")
        self.offset = int(value)

    def sort_(self, value: str) -> None:
        keys: list[SortKey] = []
        for item in value.split(","):
            descending = item.startswith("-")
            name = item[1:] if descending else item
            if name not in self.defs and name not in ("_id", "_lastUpdated"):
                raise SearchError("_sort", f"sorts only on search parameters of "
                                           f"{self.resource_type}, _id or _lastUpdated")
            keys.append(SortKey(name, descending))
            self.used.add(name)
        self.sort = tuple(keys)

    def include_(self, value: str) -> None:
        source, param, target = self._include_parts("_include", value)
        if source != self.resource_type:
            raise SearchError("_include", f"the source type must be {self.resource_type}")
        if target is not None and target not in param.targets:
            raise SearchError("_include", "the target type is not one this parameter "
                                          "refers to")
        self.includes[Include(source, param.name, target)] = None

    def revinclude_(self, value: str) -> None:
        source, param, target = self._include_parts("_revinclude", value)
        if (target or self.resource_type) != self.resource_type or (
                self.resource_type not in param.targets):
            raise SearchError("_revinclude", f"the parameter must refer to "
                                             f"{self.resource_type}")
        self.revincludes[Include(source, param.name, self.resource_type)] = None

    def _include_parts(self, name: str, value: str
                       ) -> tuple[str, SearchParameter, str | None]:
        parts = value.split(":")
        if "*" in parts:
            raise SearchError(name, "the wildcard '*' is not supported; name the parameter")
        if len(parts) not in (2, 3):
            raise SearchError(name, "use Type:parameter or Type:parameter:TargetType")
        param = self.registry.params(parts[0]).get(parts[1])
        if param is None or param.type != "reference":
            raise SearchError(name, "not a reference search parameter of a searchable type")
        return parts[0], param, parts[2] if len(parts) == 3 else None

    def elements_(self, value: str) -> None:
        known = self.registry._elements[self.resource_type]
        names: dict[str, None] = {}
        for item in value.split(","):
            if item.strip() not in known:
                raise SearchError("_elements", f"names only top-level elements of "
                                               f"{self.resource_type}")
            names.update(dict.fromkeys(known[item.strip()]))
        self.elements = tuple(names)

    def summary_(self, value: str) -> None:
        if value == "count":
            self.summary_count = True
        elif value in ("true", "text", "data"):
            raise SearchError("_summary", "true, text and data are not supported; use count "
                                          "or false")
        elif value != "false":
            raise SearchError("_summary", "must be count or false")

    def total_(self, value: str) -> None:
        if value not in ("none", "estimate", "accurate"):
            raise SearchError("_total", "must be none, estimate or accurate")
        self.total = value == "accurate"

    def format_(self, value: str) -> None:
        # An unencoded '+' (application/fhir+json) arrives as a space.
        mime = value.partition(";")[0].strip().lower().replace(" ", "+")
        if mime not in _JSON_FORMATS:
            raise UnsupportedFormat("_format", "only JSON is supported (json, "
                                               "application/fhir+json)")

    def pretty_(self, value: str) -> None:
        """_pretty is accepted and ignored: answers are compact JSON."""


_CONTROL: dict[str, Callable[[_Request, str], None]] = {
    "_count": _Request.count_,
    "_offset": _Request.offset_,
    "_sort": _Request.sort_,
    "_include": _Request.include_,
    "_revinclude": _Request.revinclude_,
    "_elements": _Request.elements_,
    "_summary": _Request.summary_,
    "_total": _Request.total_,
    "_format": _Request.format_,
    "_pretty": _Request.pretty_,
}
