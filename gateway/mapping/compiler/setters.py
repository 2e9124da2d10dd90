"""FHIR path setters: a table's target (`name.given`, `identifier[1].system`,
`birthDate.extension`) compiled once into a function that writes a value there."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from gateway.fhir import model as fhir_model
from gateway.mapping.runtime import Json, described, fill

# (the object written into, instances made so far, repetition tag, source tag, value)
Setter = Callable[[Json, dict[str, Json], str, str, Any], None]
_ELEMENT = re.compile(r"([A-Za-z][A-Za-z0-9]*)(?:\[(\d+)\])?")


def compile_setter(root: str, path: str) -> Setter:
    """A function that writes a value at `path` below a JSON object.

    A repeating element gets one instance per source repetition, shared by the rows of that
    source (key: path prefix + source tag); an indexed one (`coding[1]`) is shared by every
    row of the repetition, whatever its source (key: path prefix + repetition tag). A
    primitive's extension goes in its `_name` twin, as FHIR JSON requires. A single value
    that is already set is kept: the first row to write it wins.
    """
    steps: list[tuple[str, str, bool, bool]] = []  # (json key, prefix, repeats, indexed)
    node_type = root
    prefix = ""
    indexed = False
    parts = path.split(".")
    for i, part in enumerate(parts):
        match = _ELEMENT.fullmatch(part)
        if match is None:
            raise ValueError(f"'{part}' is not an element name")
        name = match.group(1)
        indexed = indexed or match.group(2) is not None
        element = fhir_model.element(node_type, name)
        prefix = f"{prefix}.{part}" if prefix else part
        key = name
        if element.is_primitive and i + 1 < len(parts):
            key = "_" + name  # the primitive's element twin carries id/extension
            element = fhir_model.Element("Element", element.repeats)
        steps.append((key, prefix, element.repeats, indexed))
        node_type = element.type
    *walk, (last_key, last_prefix, last_repeats, last_indexed) = steps
    if not walk and not last_repeats:
        # The most common shape (gender, birthDate, status): one single-valued element.
        def set_single(node: Json, inst: dict[str, Json], rep_tag: str, src_tag: str,
                       value: Any) -> None:
            current = node.get(last_key)
            if current is None:
                node[last_key] = value
            elif isinstance(current, dict) and isinstance(value, dict):
                fill(current, value)
        return described(set_single, "single", last_key)

    def set_value(node: Json, inst: dict[str, Json], rep_tag: str, src_tag: str,
                  value: Any) -> None:
        for key, step_prefix, repeats, step_indexed in walk:
            if repeats:
                scope_key = step_prefix + (rep_tag if step_indexed else src_tag)
                child = inst.get(scope_key)
                if child is None:
                    child = {}
                    node.setdefault(key, []).append(child)
                    inst[scope_key] = child
            else:
                child = node.get(key)
                if child is None:
                    child = node[key] = {}
            node = child
        if last_repeats:
            if isinstance(value, dict):
                scope_key = last_prefix + (rep_tag if last_indexed else src_tag)
                existing = inst.get(scope_key)
                if existing is not None:
                    fill(existing, value)
                    return
                inst[scope_key] = value
            node.setdefault(last_key, []).append(value)
        else:
            current = node.get(last_key)
            if current is None:
                node[last_key] = value
            elif isinstance(current, dict) and isinstance(value, dict):
                fill(current, value)
    return described(set_value, "walk", tuple(walk), last_key, last_prefix, last_repeats,
                     last_indexed)


def first_repeating(root: str, path: str) -> tuple[str, bool] | None:
    """The path prefix up to the first repeating element, and whether it is indexed."""
    node_type = root
    prefix = ""
    indexed = False
    for part in path.split("."):
        match = _ELEMENT.fullmatch(part)
        if match is None:
            return None
        indexed = indexed or match.group(2) is not None
        try:
            element = fhir_model.element(node_type, match.group(1))
        except fhir_model.UnknownElement:
            return None
        prefix = f"{prefix}.{part}" if prefix else part
        if element.repeats:
            return prefix, indexed
        node_type = element.type
    return None


def strip_indexes(path: str) -> str:
    return re.sub(r"\[\d+\]", "", path)
