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
from gateway.fhir.model import Element, element

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
    _check_values(resource_type, resource, resource_type, "")


# FHIR R4 §2.24.0.1 (string): "Strings SHALL NOT contain Unicode character points below
# 32, except for u0009 (horizontal tab), u0010 (carriage return) and u0013 (line feed)";
# this holds for every primitive held as a string (code, id, uri, markdown...).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_WHITESPACE = re.compile(r"\s")
# uri, url, canonical: R4 regex \S* (RFC 3986 has no whitespace).
_URI_TYPES = frozenset({"uri", "url", "canonical", "oid", "uuid"})
# An extension's url names its definition: absolute (RFC 3986 §3.1 scheme ":"), but a
# complex extension's parts are named by a simple token (R4 §2.5.0.1, "url").
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:\S+")
_TOKEN = re.compile(r"[A-Za-z0-9\-._~]+")
# A relative literal reference: Type/id, optionally /_history/vid (R4 §2.3.0, references).
_RELATIVE = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?")
_PRIMITIVE_EXTENSION = Element("Element", repeats=False)  # _birthDate: {extension: [...]}


def _check_values(root: str, value: dict[str, Any], type_name: str, path: str,
                  part: bool = False) -> None:
    """What the models accept but R4 does not, down every nested element (extensions
    included): a code outside its required binding (the models check none), a control
    character in a string, whitespace in a uri or a reference, a relative reference that
    is not Type/id, an extension url that names no definition. `part`: `value` is an
    extension inside an extension (a complex extension's part)."""
    for name, child in value.items():
        if name == "resourceType":
            continue
        if name.startswith("_"):
            info = _PRIMITIVE_EXTENSION
        else:
            try:
                info = element(type_name, name)
            except UnknownElement:
                continue  # the model check has passed; a name it allows but we cannot type
        here = f"{path}.{name}" if path else name
        items = child if isinstance(child, list) else [child]
        for index, item in enumerate(items):
            where = f"{here}.{index}" if isinstance(child, list) else here
            if isinstance(item, str):
                _check_text(root, type_name, name, info, item, where, part)
            elif isinstance(item, dict) and not info.is_primitive:
                nested = item.get("resourceType") if info.type in ("Resource",) else None
                _check_values(root, item, str(nested) if nested else info.type, where,
                              type_name == "Extension" and info.type == "Extension")


def _check_text(root: str, owner: str, name: str, info: Element, text: str,
                where: str, part: bool) -> None:
    """One string-valued primitive `name` of an element of type `owner`."""
    if info.codes and text not in info.codes:
        raise InvalidResource(root, where, "not a code of the element's required value set",
                              code="code-invalid")
    if _CONTROL.search(text):
        raise InvalidResource(root, where, "holds a control character (R4 allows only tab, "
                                           "carriage return and line feed)", code="value")
    if info.type in _URI_TYPES and _WHITESPACE.search(text):
        raise InvalidResource(root, where, "not a valid URI (holds whitespace)", code="value")
    if owner == "Reference" and name == "reference":
        _check_reference(root, text, where)
    elif owner == "Extension" and name == "url" and not (
            _ABSOLUTE.fullmatch(text) or (part and _TOKEN.fullmatch(text))):
        raise InvalidResource(root, where, "an extension url must be an absolute URI (a "
                                           "part of a complex extension: a simple name)",
                              code="value")


def _check_reference(root: str, text: str, where: str) -> None:
    """A literal reference: a fragment (#id, contained), an absolute URI (https://...,
    urn:uuid:...), a conditional reference in a transaction (Type?search), or Type/id."""
    if _WHITESPACE.search(text):
        raise InvalidResource(root, where, "not a valid reference (holds whitespace)",
                              code="value")
    if text.startswith("#") or "?" in text or _ABSOLUTE.fullmatch(text):
        return
    if not _RELATIVE.fullmatch(text):
        raise InvalidResource(root, where, "not a valid reference; use Type/id, #id or an "
                                           "absolute URI", code="value")


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
