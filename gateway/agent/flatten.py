"""FHIR resources as the flat objects an agent reads aloud: an appointment is its start,
end, status, type, provider name, location and reason, nothing more (minimum necessary).

Pure functions: names of the people and places referred to are resolved beforehand and
handed in as `Names` ('Practitioner/1' -> 'Dr Morgan Prescriber').
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Json = dict[str, Any]
Names = Mapping[str, str]

# The element order in which a CodeableConcept's words are looked for.
_PEOPLE = ("Practitioner", "PractitionerRole")


def appointment(resource: Json, names: Names) -> Json:
    actors = [_reference(p.get("actor")) for p in _dicts(resource.get("participant"))]
    return {
        "id": resource.get("id"),
        "start": resource.get("start"),
        "end": resource.get("end"),
        "status": resource.get("status"),
        "type": _concept(resource.get("appointmentType"))
        or _first_concept(resource.get("serviceType")),
        "provider_name": _named(actors, _PEOPLE, names),
        "location": _named(actors, ("Location",), names),
        "reason": _first_concept(resource.get("reasonCode")) or resource.get("description"),
    }


def slot(resource: Json, schedule_actors: Iterable[str], names: Names) -> Json:
    actors = list(schedule_actors)
    return {
        "id": resource.get("id"),
        "start": resource.get("start"),
        "end": resource.get("end"),
        "provider_name": _named(actors, _PEOPLE, names),
        "location": _named(actors, ("Location",), names),
        "type": _concept(resource.get("appointmentType"))
        or _first_concept(resource.get("serviceType")),
    }


def medication(resource: Json, dispenses: list[Json], names: Names) -> Json:
    repeats = _repeats(resource)
    handed = [str(d["whenHandedOver"]) for d in dispenses
              if isinstance(d.get("whenHandedOver"), str)]
    return {
        "id": resource.get("id"),
        "name": _concept(resource.get("medicationCodeableConcept"))
        or names.get(_reference(resource.get("medicationReference")) or ""),
        "dose": _dose(resource),
        "frequency": _frequency(resource),
        "refills_remaining": refills_remaining(repeats, len(dispenses)),
        "last_filled": max(handed) if handed else None,
        "prescriber_name": names.get(_reference(resource.get("requester")) or ""),
    }


def refills_remaining(repeats: int | None, dispensed: int) -> int | None:
    """Allowed repeats minus the dispenses recorded (never below 0); None when the order
    does not say how many repeats it allows."""
    return None if repeats is None else max(0, repeats - dispensed)


def dispensed_for(request: Json, dispenses: Iterable[Json]) -> list[Json]:
    """The dispenses recorded against this order: by reference to it, or by one of its
    identifiers (an RDS names the prescription by its placer number, ORC-2)."""
    reference = f"MedicationRequest/{request.get('id')}"
    keys = {(i.get("system"), i.get("value")) for i in _dicts(request.get("identifier"))
            if i.get("value")}
    found = []
    for dispense in dispenses:
        if dispense.get("status") in ("cancelled", "entered-in-error", "declined"):
            continue
        for prescription in _dicts(dispense.get("authorizingPrescription")):
            identifier = prescription.get("identifier")
            if prescription.get("reference") == reference or (
                    isinstance(identifier, dict)
                    and (identifier.get("system"), identifier.get("value")) in keys):
                found.append(dispense)
                break
    return found


def references(resource: Json) -> list[str]:
    """The people, places and medications a flat object names (to resolve to names)."""
    found = [_reference(p.get("actor")) for p in _dicts(resource.get("participant"))]
    found += [_reference(resource.get(key)) for key in ("requester", "medicationReference")]
    found += [_reference(a) for a in _dicts(resource.get("actor"))]
    return [r for r in found if r and r.split("/", 1)[0] in
            (*_PEOPLE, "Location", "Medication")]


def display_name(resource: Json) -> str | None:
    """How a Practitioner, Location or Medication is said: its name, as people write it."""
    kind = resource.get("resourceType")
    if kind == "Location":
        return resource.get("name") if isinstance(resource.get("name"), str) else None
    if kind == "Medication":
        return _concept(resource.get("code"))
    for name in _dicts(resource.get("name")):
        if isinstance(name.get("text"), str):
            return str(name["text"])
        parts = [*_strings(name.get("prefix")), *_strings(name.get("given")),
                 *([name["family"]] if isinstance(name.get("family"), str) else [])]
        if parts:
            return " ".join(parts)
    return None


def _named(actors: Sequence[str | None], types: tuple[str, ...], names: Names) -> str | None:
    for actor in actors:
        if actor and actor.split("/", 1)[0] in types and actor in names:
            return names[actor]
    return None


def _repeats(resource: Json) -> int | None:
    dispense = resource.get("dispenseRequest")
    value = dispense.get("numberOfRepeatsAllowed") if isinstance(dispense, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dose(resource: Json) -> str | None:
    for dosage in _dicts(resource.get("dosageInstruction")):
        if isinstance(dosage.get("text"), str):
            return str(dosage["text"])
        for rate in _dicts(dosage.get("doseAndRate")):
            quantity = rate.get("doseQuantity")
            if isinstance(quantity, dict) and quantity.get("value") is not None:
                unit = quantity.get("unit") or quantity.get("code") or ""
                return f"{quantity['value']} {unit}".strip()
    return None


def _frequency(resource: Json) -> str | None:
    for dosage in _dicts(resource.get("dosageInstruction")):
        timing = dosage.get("timing")
        if not isinstance(timing, dict):
            continue
        said = _concept(timing.get("code"))
        if said:
            return said
        repeat = timing.get("repeat")
        if isinstance(repeat, dict) and repeat.get("frequency") and repeat.get("periodUnit"):
            return (f"{repeat['frequency']} per {repeat.get('period', 1)} "
                    f"{repeat['periodUnit']}")
    return None


def _concept(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("text"), str):
        return str(value["text"])
    for coding in _dicts(value.get("coding")):
        if isinstance(coding.get("display"), str):
            return str(coding["display"])
    for coding in _dicts(value.get("coding")):
        if isinstance(coding.get("code"), str):
            return str(coding["code"])
    return None


def _first_concept(values: Any) -> str | None:
    return next((c for c in map(_concept, _dicts(values)) if c), None)


def _reference(value: Any) -> str | None:
    reference = value.get("reference") if isinstance(value, dict) else None
    return reference if isinstance(reference, str) else None


def _dicts(value: Any) -> list[Json]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
