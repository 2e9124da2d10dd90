"""The embedded store's SQL as PostgreSQL runs it (gateway.store.pg.dialect): what each
rewrite makes of a statement. The statements' results on a real server are the FHIR store
tests' (tests/store/test_fhir_store.py, test_pg_rid.py)."""

from __future__ import annotations

import pytest

from gateway.store.fhir import SearchQuery, SortKey, TokenIndex
from gateway.store.fhir_sqlite.schema import INDEX_INSERTS
from gateway.store.fhir_sqlite.sql import select_sql
from gateway.store.pg.dialect import postgres_sql


@pytest.mark.parametrize(("sqlite", "postgres"), [
    ("SELECT a FROM t WHERE b = ? AND c = ?", "SELECT a FROM t WHERE b = $1 AND c = $2"),
    # A value bound twice is named: ?N is $N, whatever its place.
    ("INSERT INTO t (a, b, c) VALUES ((SELECT x FROM u WHERE y = ?1 AND z = ?2), ?1, ?3)",
     "INSERT INTO t (a, b, c) VALUES ((SELECT x FROM u WHERE y = $1 AND z = $2), $1, $3)"),
    ("SELECT ?12", "SELECT $12"),
    ("SELECT a FROM t WHERE b = '?' AND c = ?", "SELECT a FROM t WHERE b = '?' AND c = $1"),
])
def test_placeholders_are_numbered(sqlite: str, postgres: str) -> None:
    assert postgres_sql(sqlite) == postgres


def test_a_statement_mixing_both_placeholder_styles_is_refused() -> None:
    with pytest.raises(ValueError, match="mixes"):
        postgres_sql("SELECT a FROM t WHERE b = ?1 AND c = ?")


def test_the_index_inserts_name_the_bound_type_and_id_by_number() -> None:
    assert postgres_sql(INDEX_INSERTS[TokenIndex]) == (
        "INSERT INTO fhir_token (rid, type, param, system, code) VALUES ((SELECT rid FROM "
        "fhir_resource WHERE type = $1 AND id = $2), $1, $3, $4, $5)")


def test_the_sort_value_by_rid_compares_as_jsonb() -> None:
    sql, _ = select_sql(SearchQuery("Patient", sort=(SortKey("family"),)), 10, 0)
    translated = postgres_sql(sql)
    assert translated.count("to_jsonb((SELECT min(") == 5
    assert "WHERE x.rid = r.rid AND x.param = $2)" in translated
    assert "INDEXED BY" not in translated
