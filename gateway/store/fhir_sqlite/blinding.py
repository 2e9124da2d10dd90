"""Blind indexes for the FHIR store's search tables when the data dir is sealed.

Token codes (identifiers, telecom, codes) and strings (names, addresses) are PHI the
search tables would otherwise hold in clear. Sealed, each is stored as a blind index (a
keyed MAC, `RowCodec.blind`) and each search value is blinded the same way, so the SQL is
unchanged:

- a token's code: one blind value, matched by equality (every token search is one);
- a string: a blind value of each of its first `PREFIX_ROWS` prefixes (of its normalised
  text), the last of them also carrying the blind `:exact` value. A starts-with value of
  up to `PREFIX_ROWS` characters is one equality; a longer one finds the resources whose
  value starts with its first `PREFIX_ROWS` characters, and each is checked against the
  whole value from its opened body (`BlindQuery.recheck`), so the answer is exact. Each
  prefix row is one random key in a B-tree: a row per character of every name and address
  part was ~100 rows a message, most of the apply's cost.
- a string value several parameters of one group hold (`StringLabels`: `family` and
  `given` read within `name`, `address-city` within `address`, from the search table) is
  one set of rows whose `param` is a label naming them all ("family name"); a search for
  one parameter looks up, `param IN (...)`, every label of its group holding it. The blind
  value never depended on the parameter, so a new patient's 80 rows (ADT^A01: 38 of them
  under `family`, `given` and the `address-*` parameters repeated a row of `name` or
  `address`) became 43.
- `:exact` is one equality; `:contains` is refused (SearchUnsupported, a 400).

Dates, quantities and references stay in clear: range search needs their order, and
without the sealed body they name no one (docs/encryption.md, What stays in clear).

Rows written before `PREFIX_ROWS` (a row for each prefix up to 32 characters, and the whole
text) answer the same queries: a superset of rows, still exact after the recheck. Rows
written before labels (one set per parameter, `param` its name) are found by that name,
which every search's labels include: no migration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import orjson

from gateway.store.errors import SearchUnsupported
from gateway.store.fhir import (
    Clause,
    IndexEntry,
    Indexer,
    Match,
    MissingMatch,
    SearchQuery,
    StoredResource,
    StringGroups,
    StringIndex,
    StringMatch,
    TokenIndex,
    TokenMatch,
)
from gateway.store.fhir_sqlite.schema import index_row
from gateway.store.sealing import RowCodec, SealedCodec

# Prefix rows a string value gets. Longer starts-with values are checked on the opened
# candidates, so this trades the apply's rows against how many candidates a long search
# value opens: those that share its first 8 characters (the same name, mostly).
PREFIX_ROWS = 8
# Joins the parameters of a shared row's label: a parameter name has none (lower-case
# letters, digits and '-': gateway.fhir.search.params).
LABEL_SEPARATOR = " "


class StringLabels:
    """The `param` labels of a sealed store's string rows, from the string groups: a value
    several parameters of one group hold is one row labelled with all of them, sorted
    ("family given name"); a search for one parameter matches every label of its group
    that contains it, and its own name alone (a value no other parameter holds, and the
    rows stores wrote before labels, one set per parameter)."""

    def __init__(self, groups: StringGroups,
                 recorded: Iterable[tuple[str, str]] = ()) -> None:
        """`recorded`: (type, label) of the shared labels the store's rows carry
        (`fhir_string_label`), so rows written under an earlier search table, whose
        groups were larger, are still found by each parameter their label names."""
        self._group: dict[tuple[str, str], int] = {}
        labels: dict[tuple[str, str], dict[str, None]] = {}
        for resource_type, type_groups in groups.items():
            for number, members in enumerate(type_groups):
                for param in members:
                    self._group[(resource_type, param)] = number
                    others = sorted(members - {param})
                    labels[(resource_type, param)] = dict.fromkeys(
                        label([*combination, param]) for size in range(len(others) + 1)
                        for combination in combinations(others, size))
        for resource_type, recorded_label in recorded:
            for param in recorded_label.split(LABEL_SEPARATOR):
                labels.setdefault((resource_type, param), {param: None})[recorded_label] = None
        self._labels = {key: tuple(names) for key, names in labels.items()}

    def group(self, resource_type: str, param: str) -> int | None:
        """Which of its type's groups the parameter is in; None if in none."""
        return self._group.get((resource_type, param))

    def labels(self, resource_type: str, param: str) -> tuple[str, ...]:
        """Every label a row the parameter's search must find may carry."""
        return self._labels.get((resource_type, param), (param,))

    def shared(self, resource_type: str, param: str) -> bool:
        """Whether a row of the parameter may carry a label other than its name."""
        return (resource_type, param) in self._labels


def shared_labels(string_rows: Iterable[tuple[object, ...]]) -> set[tuple[str, str]]:
    """(type, label) of the shared labels among `index_rows`' string rows: what
    `fhir_string_label` must hold once they are written."""
    return {(str(row[0]), str(row[2])) for row in string_rows
            if LABEL_SEPARATOR in str(row[2])}


NO_GROUPS = StringLabels({})


def label(params: Iterable[str]) -> str:
    return LABEL_SEPARATOR.join(sorted(params))


def index_rows(resource_type: str, id_: str, items: Iterable[IndexEntry], codec: RowCodec,
               labels: StringLabels = NO_GROUPS,
               ) -> dict[type[IndexEntry], list[tuple[object, ...]]]:
    """A resource's index rows as the store writes them, by kind: blinded on a sealed
    store, where a string value several parameters of one group hold (`family` and `name`)
    has one :exact row labelled with all of them, and a prefix is one row of its group,
    labelled with the parameters that do not find it among the rows before (none: no row;
    "springfield" and "st" both start with "s")."""
    rows: dict[type[IndexEntry], list[tuple[object, ...]]] = {}
    if not isinstance(codec, SealedCodec):
        for item in items:
            rows.setdefault(type(item), []).append(index_row(resource_type, id_, item))
        return rows
    # (group, or the parameter itself outside any, normalized, exact) -> its parameters
    shared: dict[tuple[int | str, str, str], list[str]] = {}
    for item in items:
        match item:
            case TokenIndex(param, system, code):
                rows.setdefault(TokenIndex, []).append(
                    (resource_type, id_, param, system or None, codec.blind(code, "token")))
            case StringIndex(param, normalized, exact):
                number = labels.group(resource_type, param)
                params = shared.setdefault(
                    (param if number is None else number, normalized, exact), [])
                if param not in params:
                    params.append(param)
            case _:
                rows.setdefault(type(item), []).append(index_row(resource_type, id_, item))
    if shared:
        strings: list[tuple[int | str, list[str], tuple[str, ...], str]] = []
        for (key, normalized, exact), params in shared.items():
            prefixes = codec.blind_prefixes(normalized, "prefix", PREFIX_ROWS) or (
                codec.blind(normalized, "prefix"),)  # empty text: still its :exact row
            strings.append((key, params, prefixes, codec.blind(exact, "exact")))
        out = rows.setdefault(StringIndex, [])
        # The last prefix row of each value carries its :exact value; then one plain row
        # per prefix of a group that some parameter does not find yet, naming those.
        held = {(param, prefixes[-1]) for _, params, prefixes, _ in strings
                for param in params}
        needed: dict[tuple[int | str, str], list[str]] = {}
        for key, params, prefixes, exact in strings:
            out.append((resource_type, id_, label(params), prefixes[-1], exact))
            for prefix in prefixes[:-1]:
                for param in params:
                    if (param, prefix) not in held:
                        held.add((param, prefix))
                        needed.setdefault((key, prefix), []).append(param)
        out.extend((resource_type, id_, label(params), prefix, "")
                   for (_, prefix), params in needed.items())
    return rows


@dataclass(frozen=True, slots=True)
class BlindQuery:
    """A search as the SQL runs it (values blinded) and the clauses, as given, that what it
    finds must still be checked against (starts-with values longer than the prefix rows:
    the SQL finds a superset)."""

    query: SearchQuery
    rechecks: tuple[Clause, ...] = ()
    # param -> the fhir_string labels its rows may carry, for the parameters the query
    # searches, tests for :missing or sorts by that share rows (sql.py reads them).
    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def recheck(self, found: Sequence[StoredResource], indexer: Indexer
                ) -> list[StoredResource]:
        """The resources found that hold every recheck clause, in the order found."""
        if not self.rechecks:
            return list(found)
        return [resource for resource in found if self._holds(resource, indexer)]

    def _holds(self, resource: StoredResource, indexer: Indexer) -> bool:
        strings: dict[str, list[StringIndex]] = {}
        for entry in indexer(resource.resource_type, orjson.loads(resource.body)):
            if isinstance(entry, StringIndex):
                strings.setdefault(entry.param, []).append(entry)
        return all(any(_string_holds(match, strings.get(match.param, ()))
                       for match in clause if isinstance(match, StringMatch))
                   for clause in self.rechecks)


def _string_holds(match: StringMatch, values: Iterable[StringIndex]) -> bool:
    if match.mode == "exact":
        return any(value.exact == match.value for value in values)
    return any(value.normalized.startswith(match.value) for value in values)


def blind_query(query: SearchQuery, codec: RowCodec, labels: StringLabels = NO_GROUPS
                ) -> BlindQuery:
    """The query with its token and string values blinded as `index_rows` stores them,
    what it finds still to be checked, and the row labels of its grouped parameters."""
    if not codec.sealed:
        return BlindQuery(query)
    resource_type = query.resource_type
    grouped: dict[str, tuple[str, ...]] = {}
    for param in (*(m.param for clause in query.clauses for m in clause
                    if isinstance(m, StringMatch | MissingMatch)),
                  *(key.param for key in query.sort)):
        if labels.shared(resource_type, param):
            grouped[param] = labels.labels(resource_type, param)
    rechecks = tuple(clause for clause in query.clauses if any(
        isinstance(m, StringMatch) and m.mode == "start" and len(m.value) > PREFIX_ROWS
        for m in clause))
    # Built directly, not by dataclasses.replace (a few microseconds a search, each).
    blinded = SearchQuery(query.resource_type,
                          tuple(tuple(_blind(m, codec) for m in clause)
                                for clause in query.clauses),
                          query.sort, query.count, query.offset)
    return BlindQuery(blinded, rechecks, grouped)


def _blind(match: Match, codec: RowCodec) -> Match:
    match match:
        case TokenMatch(code=code) if code is not None:
            return TokenMatch(match.param, match.system, codec.blind(code, "token"),
                              match.negate)
        case StringMatch(value=value, mode="exact", keys=keys):
            # The row carrying a value's :exact blind is its last prefix row: the blind of
            # its first PREFIX_ROWS characters (`index_rows`); stores sealed before prefix
            # rows stopped at PREFIX_ROWS put it on the whole value's blind.
            blinded = {codec.blind(key[:length], "prefix")
                       for key in keys for length in (PREFIX_ROWS, len(key))}
            return StringMatch(match.param, codec.blind(value, "exact"), "exact",
                               tuple(sorted(blinded)))
        case StringMatch(param=param, mode="contains"):
            # A blind index has no inside to look into: a clear refusal, not a search
            # that quietly finds less.
            raise SearchUnsupported(f"{param}:contains is not available on an encrypted "
                                    "store (search by the start of the value, or :exact)",
                                    f"{param}:contains")
        case StringMatch(value=value):
            # Blind values are fixed-length hex: the store's LIKE 'value%' is equality.
            return StringMatch(match.param, codec.blind(value[:PREFIX_ROWS], "prefix"),
                               "start")
    return match
