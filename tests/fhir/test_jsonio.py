"""FHIR JSON keeps decimal digits: every fractional number comes back as the Decimal sent,
and bodies without one (OIDs in strings included) stay on the fast path."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.fhir.jsonio import _FLOATISH, dumps, loads

_decimals = st.decimals(allow_nan=False, allow_infinity=False, places=3,
                        min_value=-10**6, max_value=10**6)
_leaves = st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.none(),
                    st.text(max_size=12), _decimals,
                    st.sampled_from(["urn:oid:2.16.840.1.113883.6.1", "1.5", "a:1.5,"]))
_documents = st.recursive(
    _leaves, lambda children: st.one_of(st.lists(children, max_size=4),
                                        st.dictionaries(st.text(max_size=6), children,
                                                        max_size=4)),
    max_leaves=20)


def _decimals_in(value: Any) -> list[Decimal]:
    if isinstance(value, Decimal):
        return [value]
    if isinstance(value, list):
        return [d for item in value for d in _decimals_in(item)]
    if isinstance(value, dict):
        return [d for item in value.values() for d in _decimals_in(item)]
    return []


@given(_documents, st.booleans())
def test_every_fractional_number_comes_back_as_its_decimal(document: Any,
                                                           spaced: bool) -> None:
    # Decimals are written as JSON numbers with their digits (dumps keeps them).
    body = dumps(document, pretty=spaced)
    parsed = loads(body)
    wanted = [d for d in _decimals_in(document) if d != d.to_integral_value()
              or "." in str(d) or "E" in str(d)]
    if wanted:
        assert _FLOATISH.search(body) is not None
    assert [str(d) for d in _decimals_in(parsed)] == [
        str(d) for d in _decimals_in(loads(dumps(document)))]


def test_oids_in_strings_stay_on_the_fast_path() -> None:
    body = b'{"identifier":[{"system":"urn:oid:2.16.840.1.113883.4.1","value":"1.2.3"}]}'
    assert _FLOATISH.search(body) is None
    assert loads(body)["identifier"][0]["value"] == "1.2.3"


def test_a_decimal_keeps_its_trailing_zero() -> None:
    assert loads(b'{"valueQuantity":{"value":1.50}}')["valueQuantity"]["value"] == Decimal(
        "1.50")
    assert dumps(loads(b'{"v":[0.100, 2e-3]}')) == b'{"v":[0.100,0.002]}'
