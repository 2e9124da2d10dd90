"""The FHIR request-body guard: size, nesting and array limits checked on the raw bytes
before any Python object is built, then JSON parsing and R4 validation.

Every refusal of the body itself is a BodyError (a FhirError, so the edge answers it with
an OperationOutcome in one place); a resource the R4 model refuses raises validate.py's
InvalidResource with its element path. Reasons name a limit, a position or an element,
never content from the body.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.fhir import jsonio

# The body errors are defined in errors.py; imported here too for the old import path.
from gateway.fhir.errors import BodyError as BodyError
from gateway.fhir.errors import BodyInvalid as BodyInvalid
from gateway.fhir.errors import BodyTooComplex as BodyTooComplex
from gateway.fhir.errors import BodyTooLarge as BodyTooLarge
from gateway.fhir.model import is_resource_type
from gateway.fhir.validate import validate_resource

_STRUCTURE = b"[]{},"
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in _STRUCTURE)
_OPEN_ARRAY, _OPEN_OBJECT, _COMMA = ord("["), ord("{"), ord(",")


def check_and_parse(body: bytes, *, max_bytes: int, max_depth: int,
                    max_array_items: int) -> dict[str, Any]:
    """The body as a JSON object with a resourceType, once it is within every limit."""
    if len(body) > max_bytes:
        raise BodyTooLarge(max_bytes)
    check_shape(body, max_depth=max_depth, max_array_items=max_array_items)
    try:
        document = jsonio.loads(body)  # decimals keep their digits
    except orjson.JSONDecodeError as exc:
        raise BodyInvalid(_json_error_reason(body, exc)) from None
    if not isinstance(document, dict):
        raise BodyInvalid("request body is not a JSON object")
    if not isinstance(document.get("resourceType"), str):
        raise BodyInvalid("request body has no resourceType", "resourceType")
    return document


def check_shape(body: bytes, *, max_depth: int, max_array_items: int) -> None:
    """Raise BodyTooComplex if nesting or any array exceeds its limit; build nothing.

    Strings are cut out in C (escape pairs removed, then a split on quotes), and
    everything but brackets and commas is deleted by bytes.translate; only those
    structural bytes are visited in Python. Malformed JSON is left for the parser to name.
    """
    if b"\\" in body:
        # Drop escapes so an escaped quote cannot end a string: double backslashes first
        # (left to right, as JSON pairs a run of them), then each backslash-quote.
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    pieces = body.split(b'"')
    if len(pieces) % 2 == 0:
        return  # an unterminated string: not JSON, and orjson says where
    structure = b"".join(pieces[::2]).translate(None, _NOT_STRUCTURE)
    # The open containers' item counters: commas so far for an array, -1 for an object.
    stack: list[int] = []
    commas = -1
    for char in structure:
        if char == _COMMA:
            if commas >= 0:
                commas += 1
                if commas >= max_array_items:  # commas + 1 items
                    raise BodyTooComplex(f"an array has more than {max_array_items} items")
        elif char == _OPEN_ARRAY or char == _OPEN_OBJECT:
            stack.append(commas)
            if len(stack) > max_depth:
                raise BodyTooComplex(f"nesting is deeper than {max_depth} levels")
            commas = 0 if char == _OPEN_ARRAY else -1
        elif stack:
            commas = stack.pop()
        else:
            return  # a closing bracket with nothing open: not JSON


def validate_incoming(resource: dict[str, Any], expected_type: str | None) -> None:
    """Refuse a resource whose type differs from the URL's (BodyInvalid), or that the R4
    model refuses (InvalidResource, naming the element path so a Bundle can prefix it)."""
    resource_type = resource.get("resourceType")
    if expected_type is not None and resource_type != expected_type:
        expected = expected_type if is_resource_type(expected_type) else "the URL's type"
        raise BodyInvalid(f"resourceType does not match the request URL ({expected})",
                          "resourceType")
    if not isinstance(resource_type, str) or not is_resource_type(resource_type):
        raise BodyInvalid("resourceType is not a FHIR R4 resource type", "resourceType")
    validate_resource(resource)


def _json_error_reason(body: bytes, exc: orjson.JSONDecodeError) -> str:
    """'not valid JSON (at byte N)': orjson's own text is not passed on."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"request body is not valid UTF-8 (at byte {bad.start})"
    # orjson reports a character offset; callers count bytes.
    return f"request body is not valid JSON (at byte {len(text[: exc.pos].encode())})"
