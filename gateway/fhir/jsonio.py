"""FHIR JSON in and out without losing decimal digits.

FHIR decimals keep their precision: "1.50" is not 1.5. orjson reads every number as a
float, so a body that holds a fractional or exponent number is read again with the
standard library's parser and Decimal for those numbers; Decimals go out as the digits
they came with. Bodies without such numbers (most of them) stay on orjson's fast path.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import orjson

# A JSON number with a fraction or an exponent, where a value stands (after `:`, `[` or
# `,`, before `,`, `}` or `]`): what orjson would turn into a float. OIDs in strings
# ("urn:oid:2.16.840.1") do not fit, as their dots run on; text that happens to fit only
# costs the slower parse, never a wrong value.
_FLOATISH = re.compile(
    rb"(?:^|[:\[,])\s*-?[0-9]+(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)"
    rb"\s*(?:[,}\]]|$)")


def loads(body: bytes) -> Any:
    """Parse JSON (orjson's errors for bad JSON); decimals come back as Decimal."""
    document = orjson.loads(body)
    if _FLOATISH.search(body) is None:
        return document
    return json.loads(body, parse_float=Decimal)


def dumps(value: Any, *, pretty: bool = False) -> bytes:
    return orjson.dumps(value, default=_decimal,
                        option=orjson.OPT_INDENT_2 if pretty else 0)


def _decimal(value: Any) -> Any:
    if isinstance(value, Decimal):
        # A raw fragment keeps the sender's precision.
        return orjson.Fragment(str(value).encode())
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
