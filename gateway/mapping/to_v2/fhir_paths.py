"""Reading the FHIR side: the resources of the document by reference, and the target
paths of table rows (`identifier[1].system`, `birthDate.extension`) compiled into steps."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.fhir import model as fhir_model

Json = dict[str, Any]

_STEP = re.compile(r"([A-Za-z$][A-Za-z0-9]*)(?:\[(\d+)\])?$")


class Bundle:
    """The resources of the document being translated, by fullUrl and by Type/id."""

    def __init__(self, resources: list[tuple[str, Json]]) -> None:
        self.by_url: dict[str, Json] = {}
        for full_url, resource in resources:
            if full_url:
                self.by_url[full_url] = resource
            rid = resource.get("id")
            if isinstance(rid, str) and rid:
                self.by_url.setdefault(f"{resource.get('resourceType')}/{rid}", resource)

    def resolve(self, reference: Any) -> Json | None:
        if not isinstance(reference, dict):
            return None
        target = reference.get("reference")
        if not isinstance(target, str):
            return None
        found = self.by_url.get(target)
        if found is None and "/" in target:
            found = self.by_url.get("/".join(target.rsplit("/", 2)[-2:]))
        return found


@dataclass(frozen=True, slots=True)
class Step:
    key: str  # JSON key ("_birthDate" for a primitive's extension twin)
    repeats: bool
    index: int  # n of [n], 0 when unindexed
    list_path: str  # the target text up to this step, without this step's index


def compile_path(root: str, target: str) -> tuple[list[Step], fhir_model.Element]:
    if target == "$value":
        return [Step("$value", False, 0, "$value")], fhir_model.Element(root, False)
    steps: list[Step] = []
    node_type = root
    prefix = ""
    parts = target.split(".")
    element = fhir_model.Element(root, False)
    for i, part in enumerate(parts):
        match = _STEP.match(part)
        if match is None:
            raise fhir_model.UnknownElement(f"'{part}' is not an element name")
        name, index = match.group(1), int(match.group(2) or 0)
        element = fhir_model.element(node_type, name)
        key = name
        if element.is_primitive and i + 1 < len(parts):
            key = "_" + name
            element = fhir_model.Element("Element", element.repeats)
        list_path = f"{prefix}.{name}" if prefix else name
        prefix = f"{prefix}.{part}" if prefix else part
        steps.append(Step(key, element.repeats, index, list_path))
        node_type = element.type
    return steps, element


def flatten(node: Any, steps: list[Step]) -> list[Any]:
    """Every value at a path, through every repetition (for matching constants)."""
    nodes = [node]
    for step in steps:
        nxt: list[Any] = []
        for n in nodes:
            if not isinstance(n, dict):
                continue
            value = n.get(step.key)
            if value is None:
                continue
            if isinstance(value, list):
                nxt.extend(v for v in value if v is not None)
            else:
                nxt.append(value)
        nodes = nxt
    return nodes
