"""The embedded store's SQL (gateway.store.fhir_sqlite.sql and .schema) as PostgreSQL
runs it, so both backends share one query planner and one transaction writer.

The differences are few and mechanical: placeholders are numbered (`?` in order, `?N` as
`$N`), SQLite's planner hints (INDEXED BY, a unary + that keeps an index out) go, a LIMIT
of -1 (no limit) becomes NULL, and the sort key — which SQLite takes from whichever index
table holds the parameter, whatever its type — compares as JSONB (numbers as numbers,
text as text) so that one COALESCE can hold both.
"""

from __future__ import annotations

import re
from functools import lru_cache

_INDEXED_BY = re.compile(r" INDEXED BY \w+")
_UNARY_PLUS = re.compile(r"\+(?=r\.\w)")
_SORT_VALUE = re.compile(
    r"\(SELECT (?:min|max)\(\w+\) FROM fhir_\w+ x WHERE x\.rid = r\.rid "
    r"AND x\.param = \?\)")


@lru_cache(maxsize=4096)
def postgres_sql(sql: str) -> str:
    """One statement in PostgreSQL's dialect (the result is cached: statements repeat)."""
    sql = _INDEXED_BY.sub("", sql)
    sql = _UNARY_PLUS.sub("", sql)
    sql = _SORT_VALUE.sub(lambda m: f"to_jsonb({m.group(0)})", sql)
    sql = sql.replace("LIMIT ?", "LIMIT NULLIF(?::bigint, -1)")
    return _numbered(sql)


def _numbered(sql: str) -> str:
    """'?' placeholders as $1, $2, ... and '?N' as $N (a statement that binds one value
    twice names it); none occurs inside a quoted literal here, but quoted text is copied
    as it is all the same."""
    out: list[str] = []
    count = 0
    numbered = False
    quoted = False
    for position, char in enumerate(sql):
        if char == "'":
            quoted = not quoted
        if char != "?" or quoted:
            out.append(char)
        elif sql[position + 1:position + 2].isdigit():
            numbered = True
            out.append("$")  # the digits that follow are copied as they are
        else:
            count += 1
            out.append(f"${count}")
    if numbered and count:
        # `?` counts from 1 whatever `?N` took: mixed, two values would share a number.
        raise ValueError(f"a statement mixes ? and ?N placeholders: {sql}")
    return "".join(out)
