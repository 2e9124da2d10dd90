"""Validate FHIR R4 JSON with the fhir.resources R4B models (strict mode, tests, checks).

Not on the hot path: validating a Bundle costs milliseconds; compiled tables and the value
converters are what keep ordinary output valid.
"""

from __future__ import annotations

import re
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError
from pydantic_core import ErrorDetails

# InvalidResource is defined in errors.py; imported here too for the old import path.
from gateway.fhir.errors import InvalidResource as InvalidResource
from gateway.fhir.errors import UnknownElement
from gateway.fhir.model import element

# Path steps are element names or list indexes; a key of any other shape (it came from the
# input) is not repeated. 'root' and '__root__' are fhir.resources' model-level markers.
_STEP = re.compile(r"_?[A-Za-z][A-Za-z0-9]{0,63}")
_NOT_STEPS = frozenset({"root", "__root__"})
_MAX_LEAVES = 200


def validate_resource(resource: dict[str, Any]) -> None:
    """Raise InvalidResource if the model refuses it (a Bundle validates its entries)."""
    resource_type = str(resource.get("resourceType", ""))
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError):
        raise InvalidResource(resource_type or "(none)", "resourceType",
                              "unknown resource type") from None
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        path = ".".join(_step(p) for p in first["loc"] if p not in _NOT_STEPS)
        raise InvalidResource(resource_type, path, _reason(first)) from None
    except (KeyError, TypeError):
        # fhir.resources looks a nested resource's model up by its resourceType outside
        # pydantic, so an unknown or non-string type escapes as KeyError (quoting it).
        raise InvalidResource(resource_type, "", "a nested resource has an unknown or "
                              "invalid resourceType") from None
    _check_codes(resource_type, resource, resource_type, "")


def _check_codes(root: str, value: dict[str, Any], type_name: str, path: str) -> None:
    """Codes of required bindings (Patient.gender, Observation.status...): the models
    accept any string there, so they are checked here, down every nested element."""
    for name, child in value.items():
        if name.startswith("_") or name in ("resourceType", "extension",
                                            "modifierExtension"):
            continue
        try:
            info = element(type_name, name)
        except UnknownElement:
            continue  # the model check has passed; a name it allows but we cannot type
        here = f"{path}.{name}" if path else name
        items = child if isinstance(child, list) else [child]
        for index, item in enumerate(items):
            where = f"{here}.{index}" if isinstance(child, list) else here
            if info.codes and isinstance(item, str) and item not in info.codes:
                raise InvalidResource(root, where,
                                      "not a code of the element's required value set")
            if isinstance(item, dict) and not info.is_primitive:
                nested = item.get("resourceType") if info.type in ("Resource",) else None
                _check_codes(root, item, str(nested) if nested else info.type, where)


def _step(part: int | str) -> str:
    return str(part) if isinstance(part, int) or _STEP.fullmatch(part) else "?"


def _reason(error: ErrorDetails) -> str:
    """pydantic's message without the input: no known validator quotes it, but a custom
    ValueError may, and this text goes to callers."""
    reason = error["msg"].removeprefix("Value error, ")
    for text in _strings(error.get("input"), [_MAX_LEAVES]):
        if len(text) >= 3 and text in reason:
            reason = reason.replace(text, "[value]")
    return reason


def _strings(value: Any, budget: list[int]) -> list[str]:
    """String leaves of the input (bounded: a root error's input is the whole resource)."""
    budget[0] -= 1
    if budget[0] < 0:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [text for item in value for text in _strings(item, budget)]
    return []
