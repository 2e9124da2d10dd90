"""The embedded FHIR store's SQL: a `SearchQuery` as a SELECT (or a count) over the index
tables, a `HistoryQuery` over the versions, and the writer's primary-key read of current
rows. Values are always bound, never written into the statement.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

from gateway.store.fhir import (
    DateMatch,
    HistoryQuery,
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
from gateway.store.fhir_sqlite.schema import (
    COLUMNS,
    INDEX_TABLES,
    RESOURCE_RID,
    VERSION_COLUMNS,
)

# One version of a resource, bound (type, id, version): by its rid and version, the version
# table's unique key.
VREAD_SQL = (f"SELECT {VERSION_COLUMNS} FROM fhir_version WHERE rid = {RESOURCE_RID} "
             "AND version = ?")


def current_rows_sql(counts: Sequence[int]) -> str:
    """The current rows of several types' ids, `counts[i]` ids of the i-th type, in one
    statement: a primary-key search per type (`type = ? AND id IN (...)`), joined by
    UNION ALL (a row-value `(type, id) IN (VALUES ...)` would scan the whole table)."""
    return _current_rows_sql(tuple(counts))


@functools.lru_cache(maxsize=256)
def _current_rows_sql(counts: tuple[int, ...]) -> str:
    # Made once per shape: each message of a kind reads the same counts of the same types.
    return " UNION ALL ".join(
        f"SELECT {COLUMNS} FROM fhir_resource r WHERE r.type = ? "
        f"AND r.id IN ({','.join('?' * count)})" for count in counts)


def history_sql(query: HistoryQuery) -> tuple[tuple[str, list[object]],
                                               tuple[str, list[object]]]:
    """A page of versions newest first, and the count of them all: one resource's by its
    rid (the version table's key), a type's by (type, last_updated), or every one."""
    where: list[str] = []
    params: list[object] = []
    if query.id is not None:
        where.append(f"rid = {RESOURCE_RID}")
        params += [query.resource_type, query.id]
    elif query.resource_type is not None:
        where.append("type = ?")
        params.append(query.resource_type)
    if query.since is not None:
        where.append("last_updated >= ?")
        params.append(query.since)
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    # seq follows commit order, so it breaks ties between equal instants newest first.
    page = (f"SELECT {VERSION_COLUMNS} FROM fhir_version{condition} "
            "ORDER BY last_updated DESC, seq DESC LIMIT ? OFFSET ?",
            [*params, query.count, query.offset])
    return page, (f"SELECT count(*) FROM fhir_version{condition}", params)


# param -> the labels its fhir_string rows may carry, where more than its name (a sealed
# store's shared rows: blinding.StringLabels); a parameter not in it is its own label.
Labels = Mapping[str, tuple[str, ...]]


def select_sql(query: SearchQuery, limit: int | None, offset: int,
               ordered: bool = True, labels: Labels | None = None
               ) -> tuple[str, list[object]]:
    """The page's SELECT; unordered for a condition, which only counts up to `limit`."""
    params: list[object] = []
    labels = labels or {}
    where, driven = _where(query, params, labels)
    order = f" ORDER BY {_order(query.sort, params, driven, labels)}" if ordered else ""
    params.extend((-1 if limit is None else limit, offset))
    return (f"SELECT {COLUMNS} FROM fhir_resource r WHERE {where}{order} "
            "LIMIT ? OFFSET ?", params)


def token_condition_sql(query: SearchQuery, code: str, limit: int
                        ) -> tuple[str, list[object]] | None:
    """`select_sql(query, limit, 0, ordered=False)` for a condition that is one token of a
    system and code (an identifier: every conditional write of a translated message), with
    `code` for the match's (blinded on a sealed store); None for any other query. Made
    without building the query's SQL again each time (~10 us a condition)."""
    if len(query.clauses) != 1 or query.sort or len(query.clauses[0]) != 1:
        return None
    match = query.clauses[0][0]
    if (type(match) is not TokenMatch or match.negate or match.code is None
            or not match.system):
        return None
    return _TOKEN_CONDITION, [query.resource_type, query.resource_type, match.param, code,
                              match.system, limit, 0]


def count_sql(query: SearchQuery, labels: Labels | None = None) -> tuple[str, list[object]]:
    params: list[object] = []
    where, _ = _where(query, params, labels or {})
    return f"SELECT count(*) FROM fhir_resource r WHERE {where}", params


def _where(query: SearchQuery, params: list[object], labels: Labels) -> tuple[str, bool]:
    """Clauses AND-ed, each clause's matches OR-ed; and whether some clause is an
    `r.rid IN (...)` that can drive the search (its rids looked up by key)."""
    params.append(query.resource_type)
    parts = ["r.type = ?", "r.deleted = 0"]
    driven = False
    for clause in query.clauses:
        if not clause:
            parts.append("1 = 0")  # OR over no values matches nothing
            continue
        clause_params: list[object] = []
        sql = [_match_sql(query.resource_type, m, clause_params, labels) for m in clause]
        if all(negate is False for negate, _ in sql):
            # One IN over the union, rather than ORs, which SQLite cannot drive from.
            parts.append(f"r.rid IN ({' UNION ALL '.join(sub for _, sub in sql)})")
            driven = True
        else:
            parts.append("(" + " OR ".join(
                f"r.rid {'NOT IN' if negate else 'IN'} ({sub})" for negate, sub in sql) + ")")
        params.extend(clause_params)
    if driven:
        # The rids the IN finds are looked up by key; the unary + keeps SQLite from taking
        # the (type, deleted, last_updated) index instead and testing every live resource
        # of the type against the list (0.4 ms instead of 0.01 for an identifier at 5,000
        # patients, and growing: every conditional update of an applied message runs one).
        parts[:2] = ["+r.type = ?", "+r.deleted = 0"]
    return " AND ".join(parts), driven


def _match_sql(resource_type: str, match: Match, params: list[object], labels: Labels
               ) -> tuple[bool, str]:
    """A subquery for the rids of the resources a match holds for, and whether the match
    is negated (the resource must not be among them)."""
    match match:
        case IdMatch(id):
            params.extend((resource_type, id))
            return False, "SELECT rid FROM fhir_resource WHERE type = ? AND id = ?"
        case LastUpdatedMatch(prefix, low, high):
            params.append(resource_type)
            condition = _range_sql("last_updated", "last_updated", prefix, low, high, params)
            # deleted = 0 as the outer query has it: the index (type, deleted, last_updated).
            return False, ("SELECT rid FROM fhir_resource WHERE type = ? AND deleted = 0 "
                           f"AND {condition}")
        case MissingMatch(param, missing):
            parts = []
            for table in INDEX_TABLES:
                params.append(resource_type)
                named = _param_sql(param, labels if table == "fhir_string" else {}, params)
                parts.append(f"SELECT rid FROM {table} WHERE type = ? AND {named}")
            return missing, " UNION ALL ".join(parts)
    params.append(resource_type)
    named = _param_sql(match.param, labels if isinstance(match, StringMatch) else {}, params)
    table, condition, negate = _index_condition(match, params)
    return negate, f"SELECT rid FROM {table} WHERE type = ? AND {named} AND {condition}"


def _param_sql(param: str, labels: Labels, params: list[object]) -> str:
    """The condition on an index row's param: the parameter's name, or any of its labels
    (an IN list, which SQLite looks up in the index one value at a time)."""
    names = labels.get(param)
    if names is None:
        params.append(param)
        return "param = ?"
    params.extend(names)
    return f"param IN ({','.join('?' * len(names))})"


def _index_condition(match: Match, params: list[object]) -> tuple[str, str, bool]:
    """The index table, the condition on its row, and whether the match is negated."""
    match match:
        case TokenMatch(_, system, code, negate):
            parts = ["1 = 1"]  # portable SQL (PostgreSQL runs it too: gateway.store.pg)
            if code is not None:
                parts.append("code = ?")
                params.append(code)
            if system == "":
                parts.append("system IS NULL")
            elif system is not None:
                parts.append("system = ?")
                params.append(system)
            return "fhir_token", " AND ".join(parts), negate
        case StringMatch(_, value, mode, keys):
            if mode == "exact":
                params.append(value)
                if not keys:
                    return "fhir_string", "exact = ?", False
                params.extend(keys)
                return ("fhir_string",
                        f"exact = ? AND normalized IN ({','.join('?' * len(keys))})", False)
            pattern = _like_escape(value) + "%"
            params.append(pattern if mode == "start" else "%" + pattern)
            return "fhir_string", "normalized LIKE ? ESCAPE '\\'", False
        case DateMatch(_, prefix, low, high):
            return "fhir_date", _range_sql("low", "high", prefix, low, high, params), False
        case ReferenceMatch(_, target):
            params.append(target)
            return "fhir_reference", "target = ?", False
        case QuantityMatch(_, prefix, value, system, code):
            parts = [_number_sql(prefix, value, params)]
            if system is not None:
                parts.append("system = ?")
                params.append(system)
            if code is not None:
                parts.append("code = ?")
                params.append(code)
            return "fhir_quantity", " AND ".join(parts), False
    raise TypeError(f"not a search match: {type(match).__name__}")


def _range_sql(low_col: str, high_col: str, prefix: Prefix, low: str, high: str,
               params: list[object]) -> str:
    """FHIR R4 search.html#prefix on ranges: the index range [low_col, high_col] against
    the search value's range [low, high]."""
    match prefix:
        case "eq" | "ne":
            params.extend((low, high))
            within = f"({low_col} >= ? AND {high_col} <= ?)"
            return within if prefix == "eq" else f"NOT {within}"
        case "lt":
            params.append(low)
            return f"{low_col} < ?"
        case "le":
            params.append(high)
            return f"{low_col} <= ?"
        case "gt":
            params.append(high)
            return f"{high_col} > ?"
        case "ge":
            params.append(low)
            return f"{high_col} >= ?"
        case "sa":
            params.append(high)
            return f"{low_col} > ?"
        case "eb":
            params.append(low)
            return f"{high_col} < ?"
        case "ap":  # approximately: taken as overlapping
            params.extend((high, low))
            return f"({low_col} <= ? AND {high_col} >= ?)"
    raise ValueError(f"unknown prefix {prefix!r}")


def _number_sql(prefix: Prefix, value: float, params: list[object]) -> str:
    """FHIR R4 search.html#number: eq and ne are within half the last significant digit
    of the value as written; ap within 10%."""
    match prefix:
        case "eq" | "ne":
            step = _half_step(value)
            params.extend((value - step, value + step))
            within = "(value >= ? AND value < ?)"
            return within if prefix == "eq" else f"NOT {within}"
        case "lt" | "eb":
            params.append(value)
            return "value < ?"
        case "le":
            params.append(value)
            return "value <= ?"
        case "gt" | "sa":
            params.append(value)
            return "value > ?"
        case "ge":
            params.append(value)
            return "value >= ?"
        case "ap":
            margin = abs(value) * 0.1
            params.extend((value - margin, value + margin))
            return "(value >= ? AND value <= ?)"
    raise ValueError(f"unknown prefix {prefix!r}")


def _half_step(value: float) -> float:
    """Half the last significant digit of the shortest text for `value` (5.4 -> 0.05);
    integral values count as written without decimals (100 -> 0.5)."""
    text = repr(abs(value))
    mantissa, _, exponent = text.partition("e")
    digits, _, decimals = mantissa.partition(".")
    if decimals == "0":
        decimals = ""
    return 0.5 * 10.0 ** (int(exponent or 0) - len(decimals))


def _order(sort: Iterable[SortKey], params: list[object], driven: bool, labels: Labels
           ) -> str:
    terms: list[str] = []
    for key in sort:
        direction = "DESC" if key.descending else "ASC"
        if key.param == "_id":
            terms.append(f"r.id {direction}")
        elif key.param == "_lastUpdated":
            terms.append(f"r.last_updated {direction}")
        else:
            terms.append(f"{_sort_value(key, params, labels)} {direction} NULLS LAST")
    # Always last: a total order, so that paging never repeats or skips a resource. When a
    # clause can drive the search, the unary + keeps SQLite from scanning every resource of
    # the type in last-updated order instead (fine for a few, ruinous for an identifier).
    terms.extend(("+r.last_updated DESC" if driven else "r.last_updated DESC", "r.id"))
    return ", ".join(terms)


def _sort_value(key: SortKey, params: list[object], labels: Labels) -> str:
    """The parameter's smallest index value (largest when descending), whichever kind of
    index holds it: strings by normalized text, dates by range, tokens by code."""
    pick = "max" if key.descending else "min"
    columns = (("fhir_string", "normalized"), ("fhir_date", "high" if key.descending else "low"),
               ("fhir_token", "code"), ("fhir_reference", "target"), ("fhir_quantity", "value"))
    parts = []
    for table, column in columns:
        # Without statistics SQLite may pick the lookup index (type, param, ...) and read
        # every row of the parameter for each resource; the resource's own rows are few.
        named = _param_sql(key.param, labels if table == "fhir_string" else {}, params)
        parts.append(f"(SELECT {pick}({column}) FROM {table} x INDEXED BY {table}_resource "
                     f"WHERE x.rid = r.rid AND x.{named})")
    return f"coalesce({', '.join(parts)})"


def _like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# `token_condition_sql`'s statement: what `select_sql` makes of such a condition, its
# values bound in the order that function lists them (tests/store hold the two equal).
_TOKEN_CONDITION = select_sql(SearchQuery("T", ((TokenMatch("p", "s", "c"),),)), 1, 0,
                              ordered=False)[0]
