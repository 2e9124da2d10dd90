"""What the FHIR R4 model allows: element paths, their types and cardinality.

The answers come from the fhir.resources R4B models (wire-compatible with R4 for what we
use), read once per path and cached, so table checks at start-up cost nothing per message.
Importing those models is most of what checking the tables costs (seconds), so the answers
can also be kept in a file (`load_facts`/`save_facts`, `model_cache.py`): a start that
finds them there imports no model at all.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from gateway.fhir.bindings import REQUIRED_CODES

# UnknownElement is defined in errors.py; imported here too for the old import path.
from gateway.fhir.errors import UnknownElement as UnknownElement
from gateway.fhir.model_cache import FACTS

# Python types that carry no FHIR type annotation of their own.
_PLAIN_PRIMITIVES: dict[Any, str] = {bool: "boolean", str: "string", int: "integer"}
_STEP = re.compile(r"([A-Za-z][A-Za-z0-9]*)(?:\[(\d+)\])?$")


@dataclass(frozen=True, slots=True)
class Element:
    """One element of the model: its FHIR type and whether it repeats."""

    type: str  # "HumanName", "date", "code", "Reference", "Patient" (a resource) ...
    repeats: bool
    reference_targets: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()  # the required binding's codes, for code elements that have one

    @property
    def is_primitive(self) -> bool:
        return self.type[:1].islower()


@cache
def is_resource_type(name: str) -> bool:
    known = FACTS.get(f"resource:{name}")
    if known is not None:
        return bool(known)
    FACTS.note(f"resource:{name}", _is_resource_type(name))
    return bool(FACTS.get(f"resource:{name}"))


def _is_resource_type(name: str) -> bool:
    try:
        model = get_fhir_model_class(name)
    except (KeyError, ValueError, AttributeError):
        return False
    from fhir.resources.R4B.resource import Resource

    return issubclass(model, Resource)


@cache
def required_elements(resource_type: str) -> frozenset[str]:
    """The top-level elements of a type with minimum cardinality 1, by JSON name (every
    variant of a required choice): what a subset (`_elements`, a task profile) keeps."""
    if not is_resource_type(resource_type):
        return frozenset()
    required: set[str] = set()
    for field_name, field in get_fhir_model_class(resource_type).model_fields.items():
        if field_name.endswith("__ext") or field_name == "fhir_comments":
            continue
        name = field.alias or field_name
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if isinstance(extra.get("one_of_many"), str):
            if extra.get("one_of_many_required"):
                required.add(name)
        # fhir.resources marks required complex elements as pydantic-required and
        # required primitives with 'element_required' (they may come as '_x' only).
        elif field.is_required() or extra.get("element_required"):
            required.add(name)
    return frozenset(required)


def top_level_elements(resource_type: str) -> dict[str, tuple[str, ...]]:
    """Element name -> JSON names for _elements; a choice base (`effective`) names every
    form (`effectiveDateTime`, `effectivePeriod`, ...)."""
    key = f"elements:{resource_type}"
    known = FACTS.get(key)
    if not isinstance(known, dict):
        known = _read_top_level(resource_type)
        FACTS.note(key, known)
    return {name: tuple(forms) for name, forms in known.items()}


def _read_top_level(resource_type: str) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    model = get_fhir_model_class(resource_type)
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if name.endswith("__ext") or extra.get("element_property") is not True:
            continue
        json_name = info.alias or name
        names[json_name] = [json_name]
        base = extra.get("one_of_many")
        if isinstance(base, str):
            names[base] = [*names.get(base, []), json_name]
    return names


@cache
def is_type(name: str) -> bool:
    """A FHIR data type or resource name the model knows ('HumanName', 'Patient', 'date')."""
    if name in PRIMITIVE_TYPES:
        return True
    known = FACTS.get(f"type:{name}")
    if known is not None:
        return bool(known)
    try:
        get_fhir_model_class(name)
    except (KeyError, ValueError, AttributeError):
        FACTS.note(f"type:{name}", False)
        return False
    FACTS.note(f"type:{name}", True)
    return True


PRIMITIVE_TYPES = frozenset({
    "boolean", "integer", "string", "decimal", "uri", "url", "canonical", "base64Binary",
    "instant", "date", "dateTime", "time", "code", "oid", "id", "markdown", "unsignedInt",
    "positiveInt", "uuid", "xhtml",
})


def element(root: str, path: str) -> Element:
    """The element at a dotted path below a type ('name.given', 'extension[1].valueString').

    Instance markers ([1], [2]) are accepted and ignored here: they say which instance a
    table row writes, not what the model allows.
    """
    return _element(root, tuple(path.split(".")))


@cache
def _element(root: str, steps: tuple[str, ...]) -> Element:
    current = Element(root, repeats=False)
    for step in steps:
        match = _STEP.match(step)
        if match is None:
            raise UnknownElement(f"'{step}' is not an element name")
        if current.is_primitive:
            if match.group(1) in ("extension", "id"):
                current = _child("Element", match.group(1))
                continue
            raise UnknownElement(f"{current.type} is a primitive; it has no '{step}'")
        current = _child(current.type, match.group(1))
    return current


def _child(type_name: str, name: str) -> Element:
    key = f"element:{type_name}.{name}"
    known = FACTS.get(key)
    if isinstance(known, str):
        raise UnknownElement(known)
    if isinstance(known, list):
        kind, repeats, targets, codes = known
        return Element(kind, repeats, tuple(targets), tuple(codes))
    try:
        found = _read_child(type_name, name)
    except UnknownElement as exc:
        FACTS.note(key, str(exc))
        raise
    FACTS.note(key, [found.type, found.repeats, list(found.reference_targets),
                     list(found.codes)])
    return found


def _read_child(type_name: str, name: str) -> Element:
    try:
        model = get_fhir_model_class(type_name)
    except (KeyError, ValueError, AttributeError) as exc:
        raise UnknownElement(f"unknown FHIR type {type_name}") from exc
    field = model.model_fields.get(name) or _by_alias(model.model_fields, name)
    if field is None or name.endswith("__ext") or name == "fhir_comments":
        raise UnknownElement(f"{type_name} has no element '{name}'")
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    targets = tuple(typing.cast(list[str], extra.get("enum_reference_types", [])))
    if targets == ("Resource",):
        targets = ()  # Reference(Any): every resource type may be the target
    codes = REQUIRED_CODES.get((type_name, name)) or tuple(
        typing.cast(list[str], extra.get("enum_values", [])))
    if any(not code or code == "+" for code in codes):
        codes = ()  # cut short (e.g. 'amended +') and not in bindings.py: not checked
    inner, repeats = _unwrap(field.annotation)
    return Element(_type_name(inner), repeats, targets, codes)


def _by_alias(fields: dict[str, Any], name: str) -> Any:
    """Elements named like Python keywords ('class') are stored as 'class_fhir'."""
    for field in fields.values():
        if field.alias == name:
            return field
    return None


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """Strip Optional[...] and List[...]: the element type, and whether it repeats."""
    repeats = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0]
        elif origin is list:
            repeats = True
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation, repeats


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Annotated:
        for meta in typing.get_args(annotation)[1:]:
            name = type(meta).__name__
            if name in ("EncodedBytes",):
                continue
            return name[0].lower() + name[1:]
    if annotation in _PLAIN_PRIMITIVES:
        return _PLAIN_PRIMITIVES[annotation]
    klass = getattr(annotation, "get_model_klass", None)
    if klass is not None:
        return str(klass().__name__)
    raise UnknownElement(f"cannot read the FHIR type of {annotation!r}")
