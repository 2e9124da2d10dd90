"""Search values as FHIR R4 escapes them (search.html#escaping): a "\\" before "," (which
separates values), "|" (a token's system from its code), "$" (composite parts) and "\\"
itself makes it part of the value. One module both ways, light to import (the Bundle
writer uses it in the translator process, which loads no search parameters)."""

from __future__ import annotations

import re

_ESCAPED = re.compile(r"\\([\\,|$])")
_ESCAPES = str.maketrans({"\\": "\\\\", ",": "\\,", "|": "\\|", "$": "\\$"})


def escape_value(text: str) -> str:
    """`text` as one search value: read back by `unescape_value` as it is."""
    return text.translate(_ESCAPES)


def unescape_value(text: str) -> str:
    """What one escaped search value says."""
    return _ESCAPED.sub(r"\1", text) if "\\" in text else text


def token(system: str, value: str) -> str:
    """`system|value` as one token search value, each part escaped (a conditional update
    on an identifier: a "," or "|" in an MRN must not make it name another record)."""
    return f"{escape_value(system)}|{escape_value(value)}"
