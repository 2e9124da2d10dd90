"""A conditional write's search on one identifier runs the statement `select_sql` makes of
it, with its values in the same order, blinded as `blind_query` blinds them; any other
search is left to `select_sql`."""

from __future__ import annotations

import pytest

from gateway.store.fhir import (
    IdMatch,
    SearchQuery,
    SortKey,
    StringMatch,
    TokenMatch,
)
from gateway.store.fhir_sqlite.blinding import blind_query
from gateway.store.fhir_sqlite.sql import select_sql, token_condition_sql
from gateway.store.sealing import PLAIN, DataKey, KeyRing, RowCodec, SealedCodec

SEALED = SealedCodec(KeyRing((DataKey.from_secret("k", b"k" * 32),)), "k")


@pytest.mark.parametrize("codec", [PLAIN, SEALED], ids=["plain", "sealed"])
@pytest.mark.parametrize(("resource_type", "match", "limit"), [
    ("Patient", TokenMatch("identifier", "urn:oid:1.2.3", "MRN-1"), 2),
    ("Organization", TokenMatch("identifier", "urn:x:a|b", "a,b$c\\"), 1),
    ("Observation", TokenMatch("code", "http://loinc.org", "718-7"), 50),
])
def test_an_identifier_condition_is_the_statement_select_sql_makes(
        codec: RowCodec, resource_type: str, match: TokenMatch, limit: int) -> None:
    query = SearchQuery(resource_type, ((match,),), count=None)
    assert match.code is not None
    made = token_condition_sql(query, codec.blind(match.code, "token"), limit)
    blinded = blind_query(query, codec)
    assert not blinded.rechecks
    assert made == select_sql(blinded.query, limit, 0, ordered=False,
                              labels=blinded.labels)


@pytest.mark.parametrize("query", [
    SearchQuery("Patient", ((TokenMatch("identifier", None, "MRN-1"),),)),
    SearchQuery("Patient", ((TokenMatch("identifier", "", "MRN-1"),),)),
    SearchQuery("Patient", ((TokenMatch("identifier", "urn:x", None),),)),
    SearchQuery("Patient", ((TokenMatch("identifier", "urn:x", "1", negate=True),),)),
    SearchQuery("Patient", ((TokenMatch("identifier", "urn:x", "1"),
                             TokenMatch("identifier", "urn:x", "2")),)),
    SearchQuery("Patient", ((TokenMatch("identifier", "urn:x", "1"),),
                            (TokenMatch("gender", None, "female"),))),
    SearchQuery("Patient", ((TokenMatch("identifier", "urn:x", "1"),),),
                sort=(SortKey("family"),)),
    SearchQuery("Patient", ((StringMatch("family", "smith", "start"),),)),
    SearchQuery("Patient", ((IdMatch("p-1"),),)),
    SearchQuery("Patient"),
])
def test_any_other_search_is_left_to_select_sql(query: SearchQuery) -> None:
    assert token_condition_sql(query, "code", 2) is None
