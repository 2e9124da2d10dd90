"""How fast Python can translate the bench ADT^A01 at all: a hand-written translator for
that one message shape, beside the engine, in the same run.

    python bench/translate_floor.py [--seconds S] [--instructions]

`floor_adt_a01` below reads the message as any translator must (split segments, fields,
components; look codes up; convert dates and phones; name every resource's id as the
engine does; build the transaction Bundle; write JSON bytes), but knows the message's
shape in advance: no tables, no conditions, no repeated-field loops beyond the ones this
message has, no unmapped counts, no checks of what is not there. It is not a translator
(anything else it gets wrong); it is the least work the engine's answer can cost in
CPython. Before timing, its Bundle is compared byte for byte with the engine's, for the
bench message and for 200 "new patient" messages (so it reads values, it does not hold
constants). The ratio engine / floor is what the engine's generality costs.
`--instructions` counts both with valgrind instead (`translate_instructions.py`'s way), a
figure the load of a shared machine does not move.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from translate import ADT_A01, new_patient_messages, rate  # noqa: E402
from translate_instructions import callgrind_total, instructions  # noqa: E402

from gateway.canonical.ids import name_uuid  # noqa: E402

Json = dict[str, Any]
NAMING = "urn:isthmus:naming-system:"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
PHYSICAL = "http://terminology.hl7.org/CodeSystem/location-physical-type"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
AUTHORITY_SYSTEMS = {"SSA": "http://hl7.org/fhir/sid/us-ssn"}
GENDER = {"F": "female", "M": "male", "O": "other", "U": "unknown"}
ADDRESS_USE = {"H": ("use", "home"), "M": ("type", "postal"), "B": ("use", "work")}
PHONE_USE = {"PRN": "home", "WPN": "work"}
PHONE_SYSTEM = {"PH": "phone", "Internet": "email"}
MARITAL = {"M": "Married"}
RELATIONSHIP = {"SPO": ("SPS", "spouse")}
PATIENT_CLASS = {"I": "IMP", "O": "AMB", "E": "EMER"}
ALLERGY_CATEGORY = {"DA": "medication", "FA": "food", "EA": "environment"}
CRITICALITY = {"SV": "high", "MO": "low", "MI": "low"}
SEVERITY = {"SV": "severe", "MO": "moderate", "MI": "mild"}
CODING_SYSTEMS = {"I10": "http://hl7.org/fhir/sid/icd-10"}
DIAGNOSIS_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
_REFERRED: dict[str, str] = {}  # name -> id, kept across messages as the engine keeps them
_DIGESTS: dict[str, str] = {}  # identity -> digest, likewise


def _digest(identity: str) -> str:
    digest = _DIGESTS.get(identity)
    if digest is None:
        digest = _DIGESTS[identity] = hashlib.blake2b(identity.encode(),
                                                      digest_size=12).hexdigest()
    return digest


def _referred_id(name: str) -> str:
    found = _REFERRED.get(name)
    if found is None:
        found = _REFERRED[name] = name_uuid(name)
    return found


def _date(ts: str) -> str:
    return f"{ts[:4]}-{ts[4:6]}-{ts[6:8]}"


def _phone(xtn: list[str]) -> Json:
    if xtn[2] == "Internet":
        return {"value": xtn[3], "system": "email"}
    return {"value": f"+{xtn[4]} {xtn[5]} {xtn[6]}", "use": PHONE_USE[xtn[1]],
            "system": PHONE_SYSTEM[xtn[2]]}


def _address(xad: list[str], with_country: bool) -> Json:
    address: Json = {"line": [xad[0], xad[1]] if xad[1] else [xad[0]], "city": xad[2],
                     "state": xad[3], "postalCode": xad[4]}
    if with_country:
        address["country"] = xad[5]
        kind, value = ADDRESS_USE[xad[6]]
        address[kind] = value
    return address


def _organization(system: str, value: str, entries: list[Json]) -> str:
    """An Organization referred to by identifier: its id; its entry added once."""
    id_ = _referred_id(f"Organization|{system}|{value}")
    if not any(e["fullUrl"].endswith(id_) for e in entries):
        search = f"identifier={system}|{value}"
        entries.append({"fullUrl": "urn:uuid:" + id_, "resource": {
            "resourceType": "Organization", "identifier": [{"value": value, "system": system}]},
            "request": {"method": "POST", "url": "Organization", "ifNoneExist": search}})
    return id_


def _location(name: str, code: str, parent: str | None, sender: str,
              entries: list[Json]) -> tuple[str, str]:
    """A Location referred to by content: (its id, its digest); its entry added."""
    content: Json = {"mode": "instance", "name": name}
    if parent is not None:
        content["partOf"] = {"reference": parent}
    content["physicalType"] = {"coding": [{"code": code, "system": PHYSICAL}]}
    identity = "Location|~" + orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode()
    id_ = _referred_id(f"{sender}|{identity}")
    body: Json = {"resourceType": "Location", "id": id_, "name": name,
                  "physicalType": {"coding": [{"system": PHYSICAL, "code": code}]},
                  "mode": "instance"}
    entries.append({"fullUrl": "urn:uuid:" + id_, "resource": body,
                    "request": {"method": "PUT", "url": "Location/" + id_}})
    return id_, _digest(identity)


def _practitioner(xcn: list[str], sender: str, entries: list[Json]) -> str:
    _digest(f"Practitioner||{xcn[0]}")  # what a reference holds until ids are known
    id_ = _referred_id(f"Practitioner|{sender}|{xcn[0]}")
    name: Json = {"family": xcn[1], "given": [xcn[2]]}
    if len(xcn) > 5 and xcn[5]:
        name["prefix"] = [xcn[5]]
    entries.append({"fullUrl": "urn:uuid:" + id_, "resource": {
        "resourceType": "Practitioner", "id": id_, "identifier": [{"value": xcn[0]}],
        "name": [name]}, "request": {"method": "PUT", "url": "Practitioner/" + id_}})
    return id_


def _put(resource_type: str, id_: str, body: Json) -> Json:
    return {"fullUrl": "urn:uuid:" + id_, "resource": body,
            "request": {"method": "PUT", "url": f"{resource_type}/{id_}"}}


def floor_adt_a01(raw: bytes, received_at: datetime) -> bytes:
    text = raw.decode()
    segments = {s[:3]: s.split("|") for s in text.split("\r") if s}
    msh, pid, nk1, pv1 = segments["MSH"], segments["PID"], segments["NK1"], segments["PV1"]
    al1, dg1 = segments["AL1"], segments["DG1"]
    app, facility, control = msh[2], msh[3], msh[9]
    sender = f"{app}|{facility}"
    position = f"{sender}|{control}|"
    entries: list[Json] = []
    sending = _organization(NAMING + facility, facility, entries)
    receiving = _organization(NAMING + msh[5], msh[5], entries)
    header_id = name_uuid(f"MessageHeader|{position}0")
    entries.append(_put("MessageHeader", header_id, {
        "resourceType": "MessageHeader", "id": header_id,
        "eventCoding": {"code": msh[8].split("^")[1],
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0003"},
        "source": {"name": app, "endpoint": NAMING + app},
        "sender": {"reference": "urn:uuid:" + sending},
        "destination": [{"receiver": {"reference": "urn:uuid:" + receiving},
                         "name": msh[4], "endpoint": NAMING + msh[4]}]}))
    # Patient
    identifiers = []
    for cx in (rep.split("^") for rep in pid[3].split("~")):
        system = AUTHORITY_SYSTEMS.get(cx[3]) or NAMING + cx[3]
        assigner = _organization(system, cx[3], entries)
        identifiers.append({"value": cx[0], "system": system, "assigner": {
            "reference": "urn:uuid:" + assigner, "display": cx[3]},
            "type": {"coding": [{"code": cx[4], "system": V2_0203}]}})
    if len(pid) > 19 and pid[19]:
        identifiers.append({"value": pid[19], "system": AUTHORITY_SYSTEMS["SSA"],
                            "type": {"coding": [{"system": V2_0203, "code": "SS"}]}})
    names = []
    for xpn in (rep.split("^") for rep in pid[5].split("~")):
        name: Json = {"family": xpn[0], "given": [g for g in xpn[1:3] if g]}
        if xpn[4]:
            name["prefix"] = [xpn[4]]
        if xpn[6] == "L":
            name["use"] = "official"
        names.append(name)
    language = pid[15].split("^")
    marital = pid[16].split("^")
    patient_system, patient_value = identifiers[0]["system"], identifiers[0]["value"]
    patient_id = name_uuid(f"Patient|{patient_system}|{patient_value}")
    patient = {
        "resourceType": "Patient", "identifier": identifiers, "name": names,
        "birthDate": _date(pid[7]), "gender": GENDER[pid[8]],
        "address": [_address(rep.split("^"), True) for rep in pid[11].split("~")],
        "telecom": [_phone(rep.split("^")) for rep in (*pid[13].split("~"), pid[14])],
        "communication": [{"language": {"coding": [
            {"code": language[0], "display": language[1], "system": "urn:ietf:bcp:47"}],
            "text": language[1]}}],
        "maritalStatus": {"coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
             "code": marital[0], "display": MARITAL[marital[0]]},
            {"code": marital[0], "display": marital[1],
             "system": "http://terminology.hl7.org/CodeSystem/v2-0002"}],
            "text": marital[1]}}
    entries.append({"fullUrl": "urn:uuid:" + patient_id, "resource": patient, "request": {
        "method": "PUT", "url": f"Patient?identifier={patient_system}|{patient_value}"}})
    patient_ref = {"reference": "urn:uuid:" + patient_id}
    # RelatedPerson
    kin_id = name_uuid(f"RelatedPerson|{position}0")
    kin_name = nk1[2].split("^")
    relation = nk1[3].split("^")
    v3_code, v3_display = RELATIONSHIP[relation[0]]
    entries.append(_put("RelatedPerson", kin_id, {
        "resourceType": "RelatedPerson", "id": kin_id,
        "name": [{"family": kin_name[0], "given": [kin_name[1]]}],
        "relationship": [{"coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": v3_code,
             "display": v3_display},
            {"code": relation[0], "display": relation[1],
             "system": "http://terminology.hl7.org/CodeSystem/v2-0063"}],
            "text": relation[1]}],
        "address": [_address(nk1[4].split("^"), False)],
        "telecom": [_phone(nk1[5].split("^"))], "patient": patient_ref}))
    # Locations, doctors, Encounter
    pl = pv1[3].split("^")
    site, site_digest = _location(pl[3], "si", None, sender, entries)
    ward, ward_digest = _location(pl[0], "wa", site_digest, sender, entries)
    entries[-1]["resource"]["partOf"] = {"reference": "urn:uuid:" + site}
    room, room_digest = _location(pl[1], "ro", ward_digest, sender, entries)
    entries[-1]["resource"]["partOf"] = {"reference": "urn:uuid:" + ward}
    bed, _ = _location(pl[2], "bd", room_digest, sender, entries)
    entries[-1]["resource"]["partOf"] = {"reference": "urn:uuid:" + room}
    attending = _practitioner(pv1[7].split("^"), sender, entries)
    referring = _practitioner(pv1[8].split("^"), sender, entries)
    service, _ = _location(pv1[11], "wa", None, sender, entries)
    encounter_id = name_uuid(f"Encounter|{position}0")
    condition_id = name_uuid(f"Condition|{position}0")
    encounter_ref = {"reference": "urn:uuid:" + encounter_id}
    entries.append(_put("Encounter", encounter_id, {
        "resourceType": "Encounter", "id": encounter_id,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                  "code": PATIENT_CLASS[pv1[2]]},
        "status": "in-progress",
        "location": [{"location": {"reference": "urn:uuid:" + bed}, "status": "active"},
                     {"location": {"reference": "urn:uuid:" + service}, "status": "active"}],
        "participant": [
            {"individual": {"reference": "urn:uuid:" + attending},
             "type": [{"coding": [{"system": PARTICIPATION, "code": "ATND"}]}]},
            {"individual": {"reference": "urn:uuid:" + referring},
             "type": [{"coding": [{"system": PARTICIPATION, "code": "REF"}]}]}],
        "hospitalization": {"specialArrangement": [{"coding": [{"code": pv1[15]}]}]},
        "subject": patient_ref,
        "diagnosis": [{"condition": {"reference": "urn:uuid:" + condition_id}}]}))
    # AllergyIntolerance, Condition
    allergy_id = name_uuid(f"AllergyIntolerance|{position}0")
    allergen = al1[3].split("^")
    entries.append(_put("AllergyIntolerance", allergy_id, {
        "resourceType": "AllergyIntolerance", "id": allergy_id,
        "clinicalStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
            "code": "active"}]},
        "category": [ALLERGY_CATEGORY[al1[2]]], "type": "allergy",
        "code": {"coding": [{"code": allergen[0], "display": allergen[1],
                             "system": allergen[2]}], "text": allergen[1]},
        "criticality": CRITICALITY[al1[4]],
        "reaction": [{"severity": SEVERITY[al1[4]], "manifestation": [{"text": al1[5]}]}],
        "patient": patient_ref, "encounter": encounter_ref}))
    diagnosis = dg1[3].split("^")
    entries.append(_put("Condition", condition_id, {
        "resourceType": "Condition", "id": condition_id,
        "category": [{"coding": [{"system": DIAGNOSIS_CATEGORY,
                                  "code": "encounter-diagnosis"}]}],
        "code": {"coding": [{"code": diagnosis[0], "display": diagnosis[1],
                             "system": CODING_SYSTEMS[diagnosis[2]]}],
                 "text": diagnosis[1]},
        "onsetDateTime": _date(dg1[5]), "subject": patient_ref,
        "encounter": encounter_ref}))
    entries.append(_provenance(entries, app, facility, control, msh[8], received_at))
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def _provenance(entries: list[Json], app: str, facility: str, control: str,
                message_type: str, received_at: datetime) -> Json:
    id_ = name_uuid(f"Provenance|{app}|{facility}|{control}")
    who = f"{app}^{facility}"
    return _put("Provenance", id_, {
        "resourceType": "Provenance", "id": id_,
        "target": [{"reference": e["fullUrl"]} for e in entries],
        "recorded": received_at.isoformat(timespec="milliseconds"),
        "activity": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
            "code": "UPDATE"}]},
        "agent": [{"type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
            "code": "author"}]},
            "who": {"identifier": {"system": "urn:isthmus:hl7v2:sender", "value": who},
                    "display": who}}],
        "entity": [{"role": "source", "what": {
            "display": "^".join(message_type.split("^")[:2]),
            "identifier": {"system": "urn:isthmus:hl7v2:control-id", "value": control}}}]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions with valgrind instead of timing")
    args = parser.parse_args()

    from gateway.config.cache import compiled_tables_dir
    from gateway.fhir.bundle import dumps, to_bundle
    from gateway.hl7.message import parse_message
    from gateway.mapping.engine import Translator

    translator = Translator.load(cache=compiled_tables_dir(), generate=True)
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def engine(raw: bytes) -> bytes:
        translation = translator.translate(parse_message(raw), at)
        return dumps(to_bundle(translation))

    messages = [ADT_A01.encode()] + [m.encode() for m in new_patient_messages(200)]
    for raw in messages:
        if engine(raw) != floor_adt_a01(raw, at):
            sys.exit("the floor's Bundle differs from the engine's: not comparable")
    print(f"same Bundle bytes for {len(messages)} messages")
    if args.instructions:
        print_instructions()
        return
    one = messages[0]
    rows = [("engine (generated tables)", lambda: engine(one)),
            ("floor (hand-written, this shape only)", lambda: floor_adt_a01(one, at))]
    print(f"{'ADT^A01':40} {'msg/s':>9} {'us/msg':>8}")
    figures = []
    for label, work in rows * 2:  # alternated, twice: a shared machine drifts
        per_second, micros = rate(work, args.seconds)
        figures.append(micros)
        print(f"{label:40} {per_second:9,.0f} {micros:8.1f}")
    engine_us = min(figures[0::2])
    floor_us = min(figures[1::2])
    print(f"engine / floor: {engine_us / floor_us:.2f}x   "
          f"(10,000 msg/s is 100 us; floor {floor_us:.1f} us)")


# A child that runs the floor 20 + N times (as translate_instructions.py's runs the engine).
FLOOR_CHILD = r"""
import sys
from datetime import UTC, datetime
sys.path[:0] = ["bench", "."]
from translate_floor import ADT_A01, floor_adt_a01
raw, at = ADT_A01.encode(), datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
for _ in range(20 + int(sys.argv[1])):
    floor_adt_a01(raw, at)
"""


def print_instructions(count: int = 100) -> None:
    engine = instructions(ROOT, ADT_A01, count)
    engine -= instructions(ROOT, ADT_A01, 0)
    floor = callgrind_total(ROOT, [FLOOR_CHILD, str(count)], {})
    floor -= callgrind_total(ROOT, [FLOOR_CHILD, "0"], {})
    print(f"{'ADT^A01':40} {'instructions/msg':>16}")
    print(f"{'engine (generated tables)':40} {engine // count:16,}")
    print(f"{'floor (hand-written, this shape only)':40} {floor // count:16,}")
    print(f"engine / floor: {engine / floor:.2f}x")


if __name__ == "__main__":
    main()
