"""FHIR search request parsing: query parameters into the store's `SearchQuery` and the
result options (_count, _sort, _include, _elements, ...).

Errors name the parameter and the rule, never a value: search values are PHI.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast, get_args

from gateway.fhir.errors import SearchError, UnsupportedFormat
from gateway.fhir.escaping import unescape_value
from gateway.fhir.search.index import date_range, normalize, normalize_contact, reference_target
from gateway.fhir.search.params import SearchParameter
from gateway.store.fhir import (
    Clause,
    DateMatch,
    IdMatch,
    LastUpdatedMatch,
    Match,
    MissingMatch,
    Prefix,
    QuantityMatch,
    ReferenceMatch,
    SearchQuery,
    SortKey,
    StringMatch,
    TokenMatch,
)

PREFIXES: frozenset[str] = frozenset(get_args(Prefix))
MAX_VALUES = 100  # comma-separated values in one parameter: bounds the store's OR clause
# Each parameter is an AND-ed clause and each value a subquery in the store's SQL: past
# SQLite's limits (expression depth, bound variables) a search would fail as a 503, so
# the request is refused first, with a 400 naming the rule. A search needs a handful.
MAX_REPEATS = 20  # one parameter given again and again (date=ge..&date=le.. is two)
MAX_PARAMETERS = 100  # parameters in one search, whatever their names
MAX_TOTAL_VALUES = 1000  # values in all parameters together

# FHIR R4 §2.24.0.1 id.
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_SHOWN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.]{0,63}")
_DIGITS = re.compile(r"\d{1,9}")

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
    # Parameters ignored under lenient handling (unknown names, as sent): left out of links.
    ignored: frozenset[str] = frozenset()


def parse_query(resource_type: str, defs: Mapping[str, SearchParameter],
                params: Sequence[tuple[str, str]], *,
                params_of: Callable[[str], Mapping[str, SearchParameter]],
                elements: Mapping[str, tuple[str, ...]], default_count: int, max_count: int,
                lenient: bool) -> ParsedSearch:
    """The query parameters of a search on `resource_type` (whose parameters are `defs`)
    as a store query and result options. `params_of` gives another type's parameters
    (for _include), `elements` the type's top-level elements (for _elements)."""
    _check_counts(params)
    request = _Request(resource_type, defs, params_of, elements, max_count)
    for raw_name, value in params:
        request.add(raw_name, value, lenient)
    return request.result(default_count)


def _check_counts(params: Sequence[tuple[str, str]]) -> None:
    """Refuse a search with more parameters, repeats or values than the caps, before any
    parameter is read (a thousand of them cost a thousand parses otherwise)."""
    repeats: dict[str, int] = {}
    values = 0
    for raw_name, value in params:
        name = raw_name.partition(":")[0]
        repeats[name] = repeats.get(name, 0) + 1
        if repeats[name] > MAX_REPEATS:
            raise SearchError(_shown(name), f"given more than {MAX_REPEATS} times")
        values += value.count(",") + 1
    if len(params) > MAX_PARAMETERS:
        raise SearchError("", f"at most {MAX_PARAMETERS} parameters in one search")
    if values > MAX_TOTAL_VALUES:
        raise SearchError("", f"at most {MAX_TOTAL_VALUES} values in all parameters of "
                              "one search")


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


def _shown(name: str) -> str:
    """A parameter name fit for an error message (a name, never a value in disguise)."""
    return name if _SHOWN_NAME.fullmatch(name) else "(parameter)"


class _Request:
    """The state of one parse: clauses and options gathered parameter by parameter."""

    def __init__(self, resource_type: str, defs: Mapping[str, SearchParameter],
                 params_of: Callable[[str], Mapping[str, SearchParameter]],
                 elements: Mapping[str, tuple[str, ...]], max_count: int) -> None:
        self.resource_type = resource_type
        self.defs = defs
        self.params_of = params_of
        self.known_elements = elements
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
        self.ignored: set[str] = set()
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
                            "&".join(self.shape), frozenset(self.ignored))

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
                self.ignored.add(raw_name)
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
            text = unescape_value(item)
            if modifier == "exact":
                return [StringMatch(name, text, "exact", (normalize(text),))]
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
            return None, unescape_value(parts[0])
        if len(parts) > 2 or parts == ["", ""]:
            raise SearchError(name, "not a valid token; use code, system|code, |code or "
                                    "system|")
        return unescape_value(parts[0]), unescape_value(parts[1]) or None

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
        system, code = unescape_value(parts[1]) or None, unescape_value(parts[2]) or None
        return QuantityMatch(name, prefix, number, system, code)

    def _references(self, param: SearchParameter, modifier: str, item: str) -> list[str]:
        text = unescape_value(item)
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
        if self.count == 0:  # no entries wanted: what is asked is the total (as _summary=count)
            self.summary_count = True

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
        param = self.params_of(parts[0]).get(parts[1])
        if param is None or param.type != "reference":
            raise SearchError(name, "not a reference search parameter of a searchable type")
        return parts[0], param, parts[2] if len(parts) == 3 else None

    def elements_(self, value: str) -> None:
        known = self.known_elements
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
