"""Synthetic test data: one builder per FHIR resource, with keyword overrides.

A builder writes only what it is asked for (plus `resourceType`), so each suite states the
elements its tests depend on; a suite with a house style binds it once with
`functools.partial(patient, ...)`. Every value here is made up (no PHI, ever).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

Json = dict[str, Any]

# HL7's example OID arc (2.16.840.1.113883.19): a namespace no real system uses.
IDENTIFIER_SYSTEM = "urn:oid:2.16.840.1.113883.19.5.99"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def _resource(resource_type: str, elements: Json) -> Json:
    """`resourceType`, then `id` when given, so builders keep the usual element order.
    Values are copied: a default bound with partial() is never shared between resources."""
    elements.update(copy.deepcopy(elements))
    head: Json = {"resourceType": resource_type}
    if "id" in elements:
        head["id"] = elements.pop("id")
    return head


def _identified(resource: Json, label: str | None, system: str) -> None:
    if label is not None:
        resource["identifier"] = [{"system": system, "value": label}]


def patient(label: str | None = None, *, system: str = IDENTIFIER_SYSTEM,
            family: str | None = None, given: Sequence[str] = (), **elements: Any) -> Json:
    """A Patient: identifier `label` in `system`, one name from `family`/`given`, then the
    other elements as given (`id=`, `birthDate=`, `telecom=`, or `name=` to replace it)."""
    resource = _resource("Patient", elements)
    if "active" in elements:
        resource["active"] = elements.pop("active")
    _identified(resource, label, system)
    if family is not None or given:
        name: Json = {} if family is None else {"family": family}
        if given:
            name["given"] = list(given)
        resource["name"] = [name]
    return resource | elements


def observation(subject: str | None = None, *, label: str | None = None,
                system: str = IDENTIFIER_SYSTEM, status: str | None = "final",
                loinc: str | None = None, quantity: tuple[float, str] | None = None,
                **elements: Any) -> Json:
    """An Observation about `subject` (a reference): `status`, a LOINC `code`, a UCUM
    `valueQuantity` (value, unit code), then the other elements as given (`code=` too)."""
    resource = _resource("Observation", elements)
    _identified(resource, label, system)
    if status is not None:
        resource["status"] = status
    if loinc is not None:
        resource["code"] = {"coding": [{"system": LOINC, "code": loinc}]}
    if subject is not None:
        resource["subject"] = {"reference": subject}
    if quantity is not None:
        value, unit = quantity
        resource["valueQuantity"] = {"value": value, "system": UCUM, "code": unit}
    return resource | elements


def encounter(subject: str | None = None, *, label: str | None = None,
              system: str = IDENTIFIER_SYSTEM, status: str = "finished",
              class_code: str = "AMB", **elements: Any) -> Json:
    """An Encounter of `subject` (a reference): `status`, `class` by code, then the other
    elements as given (`period=`...)."""
    resource = _resource("Encounter", elements)
    _identified(resource, label, system)
    resource["status"] = status
    resource["class"] = {"code": class_code}
    if subject is not None:
        resource["subject"] = {"reference": subject}
    return resource | elements


def hl7(*segments: str) -> bytes:
    """A v2 message from its segment lines, CR-terminated as on the wire."""
    return ("\r".join(segments) + "\r").encode()


def with_fields(raw: bytes, segment: str, values: Mapping[int, str | bytes]) -> bytes:
    """A copy of `raw` with fields of its first `segment` replaced, keyed by the standard's
    numbering (MSH-10 is {10: ...}; MSH-1 is the separator itself), padded if short."""
    lines = raw.split(b"\r")
    head = segment.encode() + b"|"
    index = next(i for i, line in enumerate(lines) if line.startswith(head))
    fields = lines[index].split(b"|")
    offset = 1 if segment == "MSH" else 0  # split index = number - 1 for MSH only
    for number, value in values.items():
        position = number - offset
        fields.extend([b""] * (position + 1 - len(fields)))
        fields[position] = value.encode() if isinstance(value, str) else value
    lines[index] = b"|".join(fields)
    return b"\r".join(lines)
