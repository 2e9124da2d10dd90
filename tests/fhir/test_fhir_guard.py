"""The FHIR request-body guard: limits before parsing, clear 4xx answers that never quote
the body."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from gateway.fhir.guard import (
    BodyError,
    BodyInvalid,
    BodyTooComplex,
    BodyTooLarge,
    check_and_parse,
    check_shape,
    validate_incoming,
)
from gateway.fhir.outcome import FhirError
from gateway.fhir.validate import InvalidResource, validate_resource

LIMITS = {"max_bytes": 4096, "max_depth": 5, "max_array_items": 3}


def _parse(body: bytes, **limits: int) -> dict[str, Any]:
    return check_and_parse(body, **(LIMITS | limits))


def _nested(depth: int) -> bytes:
    """A Patient whose deepest container is at `depth` (the resource itself is 1)."""
    inner: Any = "x"
    for _ in range(depth - 1):
        inner = {"a": inner}
    return orjson.dumps({"resourceType": "Patient", "z": inner})


def _sized(size: int) -> bytes:
    head = b'{"resourceType": "Patient"'
    return head + b" " * (size - len(head) - 1) + b"}"


def _array(items: int) -> bytes:
    return orjson.dumps({"resourceType": "Patient", "z": list(range(items))})


@pytest.mark.parametrize(("body", "limits", "error"), [
    (_sized(4096), {}, None),  # exactly max_bytes
    (_sized(4097), {}, BodyTooLarge),
    (_sized(4097), {"max_bytes": 4097}, None),
    (_nested(5), {}, None),  # exactly max_depth
    (_nested(6), {}, BodyTooComplex),
    (_array(3), {}, None),  # exactly max_array_items
    (_array(4), {}, BodyTooComplex),
    (_array(0), {}, None),
    (orjson.dumps({"resourceType": "Patient", "z": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]}),
     {}, None),  # commas of inner arrays are not the outer array's
    (orjson.dumps({"resourceType": "Patient", "z": [[1, 2, 3, 4]]}), {}, BodyTooComplex),
    (orjson.dumps({"resourceType": "Patient", "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}),
     {}, None),  # object members are not array items
    (orjson.dumps({"resourceType": "Patient", "z": [{"a": 1, "b": 2, "c": 3, "d": 4}]}),
     {}, None),
    (orjson.dumps([[[[[[1]]]]]]), {}, BodyTooComplex),  # the shape is checked first
])
def test_limits(body: bytes, limits: dict[str, int], error: type[BodyError] | None) -> None:
    if error is None:
        assert _parse(body, **limits) == orjson.loads(body)
    else:
        with pytest.raises(error) as caught:
            _parse(body, **limits)
        assert caught.value.status == 413


@pytest.mark.parametrize(("error", "named"), [
    (BodyTooLarge, "4096 bytes"), (BodyTooComplex, "5 levels"),
    (BodyTooComplex, "3 items")])
def test_limit_errors_name_the_limit(error: type[BodyError], named: str) -> None:
    body = {"4096 bytes": _sized(5000), "5 levels": _nested(9),
            "3 items": _array(9)}[named]
    with pytest.raises(error, match=named):
        _parse(body)


@pytest.mark.parametrize("value", [
    "[[[[[[[[[[", "]]]]]]]]", "{{{{{{{{", "a,b,c,d,e,f", '\\"[[[[[[[[', 'x\\\\', '\\\\"',
    '\\\\\\"[[[[[[', "\\u005b[[[[[[[", "} ] , { [",
])
def test_brackets_commas_and_escaped_quotes_inside_strings_do_not_count(value: str) -> None:
    body = orjson.dumps({"resourceType": "Patient", "z": [value, value, value],
                         "y": {"k": value}})
    assert _parse(body)["z"] == [value, value, value]


@pytest.mark.parametrize("seed", range(40))
def test_shape_check_agrees_with_the_parsed_document(seed: int) -> None:
    rng = random.Random(seed)
    document = {"resourceType": "Patient", "z": _random_value(rng, 0)}
    body = orjson.dumps(document)
    depth, widest = _depth(document), _widest(document)
    check_shape(body, max_depth=depth, max_array_items=max(widest, 1))
    with pytest.raises(BodyTooComplex):
        check_shape(body, max_depth=depth - 1, max_array_items=10**6)
    if widest > 1:
        with pytest.raises(BodyTooComplex):
            check_shape(body, max_depth=100, max_array_items=widest - 1)


_TRICKY = ['"', "\\", "[", "]", "{", "}", ",", "\\\"", "\\\\\"", "a", " ", "é", "\n"]


def _random_value(rng: random.Random, level: int) -> Any:
    kind = rng.choice(["str", "num", "list", "dict"] if level < 6 else ["str", "num"])
    if kind == "str":
        return "".join(rng.choice(_TRICKY) for _ in range(rng.randrange(6)))
    if kind == "num":
        return rng.choice([0, -1.5, True, None, 12345])
    if kind == "list":
        return [_random_value(rng, level + 1) for _ in range(rng.randrange(5))]
    return {"".join(rng.choice(_TRICKY) for _ in range(3)) + str(i):
            _random_value(rng, level + 1) for i in range(rng.randrange(4))}


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _widest(value: Any) -> int:
    if isinstance(value, dict):
        return max((_widest(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return max([len(value), *(_widest(v) for v in value)])
    return 0


@pytest.mark.parametrize(("body", "reason"), [
    (b'{"resourceType": "Patient", "name": "ZZCANARY",}', "not valid JSON (at byte 46)"),
    (b'{"resourceType": "Patient", "name": "ZZCANARY', "not valid JSON"),
    ('{"resourceType": "Patient", "name": "ZZCANARYé" x}'.encode(),
     "not valid JSON (at byte 49)"),  # a byte offset, not a character offset
    (b'{"name": "ZZCANARY\xff"}', "not valid UTF-8 (at byte 18)"),
    (b"ZZCANARY", "not valid JSON (at byte 0)"),
    (b"", "not valid JSON"),
    (b'["ZZCANARY"]', "not a JSON object"),
    (b'"ZZCANARY"', "not a JSON object"),
    (b'{"name": "ZZCANARY"}', "no resourceType"),
    (b'{"resourceType": ["ZZCANARY"]}', "no resourceType"),
    (b'{"resourceType": "Patient"}]]]]]]]', "not valid JSON"),
])
def test_invalid_bodies_get_400_without_content(body: bytes, reason: str) -> None:
    with pytest.raises(BodyInvalid) as caught:
        _parse(body)
    assert caught.value.status == 400
    assert reason in caught.value.reason
    assert "ZZCANARY" not in str(caught.value)


def test_body_errors_are_fhir_errors_for_the_edge() -> None:
    assert issubclass(BodyError, FhirError)
    error = BodyTooLarge(10)
    assert (error.status, error.code) == (413, "too-costly")
    assert BodyInvalid("x").code == "invalid"


@pytest.mark.parametrize(("resource", "expected_type", "expression"), [
    ({"resourceType": "Observation", "id": "x"}, "Patient", "resourceType"),
    ({"resourceType": "ZZCANARYTYPE"}, "Patient", "resourceType"),
    ({"resourceType": "ZZCANARYTYPE"}, None, "resourceType"),
    ({"resourceType": "HumanName", "family": "x"}, None, "resourceType"),  # a data type
])
def test_resource_type_must_match_the_url_and_be_a_resource(
        resource: dict[str, Any], expected_type: str | None, expression: str) -> None:
    with pytest.raises(BodyInvalid) as caught:
        validate_incoming(resource, expected_type)
    assert caught.value.status == 400
    assert caught.value.expression == expression
    assert "ZZCANARY" not in str(caught.value)


# (resource, the element path named, the value that must not appear)
INVALID = [
    ({"birthDate": "ZZCANARY-1985"}, "Patient.birthDate", "ZZCANARY"),
    ({"birthDate": "1985-02-30"}, "Patient.birthDate", "1985-02-30"),
    ({"name": [{"family": "ok"}, {"family": ["ZZCANARYLIST"]}]}, "Patient.name.1.family",
     "ZZCANARYLIST"),
    ({"name": [{"family": 19850214}]}, "Patient.name.0.family", "19850214"),
    ({"name": "ZZCANARYSTR"}, "Patient.name", "ZZCANARYSTR"),
    ({"active": "ZZCANARYBOOL"}, "Patient.active", "ZZCANARYBOOL"),
    ({"id": "ZZ CANARY id!"}, "Patient.id", "ZZ CANARY"),
    ({"multipleBirthInteger": "ZZCANARY12"}, "Patient.multipleBirthInteger", "ZZCANARY12"),
    ({"ZZCANARYELEMENT": "ZZVALUE"}, "Patient.ZZCANARYELEMENT", "ZZVALUE"),  # unknown
    ({"Zephyrina Quixotefake": "x"}, "Patient.?", "Quixotefake"),  # not even a name
    ({"telecom": [{"period": {"end": "ZZCANARYEND"}}]}, "Patient.telecom.0.period.end",
     "ZZCANARYEND"),
    ({"photo": [{"data": "ZZCANARY!!base64"}]}, "Patient.photo.0.data", "ZZCANARY"),
    ({"deceasedBoolean": True, "deceasedDateTime": "2020-01-01"}, "Patient", "2020-01-01"),
    ({"deceasedDateTime": "ZZCANARY"}, "Patient.deceasedDateTime", "ZZCANARY"),
    ({"contained": [{"resourceType": "ZZCANARYTYPE"}]}, "Patient", "ZZCANARY"),
    ({"contained": [{"resourceType": 19850214}]}, "Patient", "19850214"),
    ({"contained": [{"resourceType": "Observation", "status": "final", "code": {},
                     "valueString": 19850214}]},
     "Patient.contained.0.valueString", "19850214"),
]


@pytest.mark.parametrize(("fields", "expression", "value"), INVALID)
def test_validation_errors_name_the_element_never_the_value(
        fields: dict[str, Any], expression: str, value: str) -> None:
    with pytest.raises(InvalidResource) as caught:
        validate_incoming({"resourceType": "Patient"} | fields, "Patient")
    error = caught.value
    assert f"{error.resource_type}.{error.path}".rstrip(".") == expression
    assert value not in str(error) and value not in error.reason


@pytest.mark.parametrize(("resource", "path"), [
    ({"resourceType": "Observation", "status": "final"}, "code"),
    ({"resourceType": "Bundle", "type": "collection",
      "entry": [{"resource": {"resourceType": "Patient", "birthDate": "ZZCANARY"}}]},
     "entry.0.resource.birthDate"),
])
def test_validate_resource_names_the_path(resource: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidResource) as caught:
        validate_resource(resource)
    assert caught.value.path == path
    assert "ZZCANARY" not in str(caught.value)


def test_a_valid_resource_passes() -> None:
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "1985-02-14",
               "name": [{"family": "Example", "given": ["Test"]}]}
    body = orjson.dumps(patient)
    parsed = _parse(body)
    validate_incoming(parsed, "Patient")
    validate_incoming(parsed, None)
