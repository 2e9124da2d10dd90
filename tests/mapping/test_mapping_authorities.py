"""Assigning authorities and places: identifier systems from the naming-system tables, an
Organization per authority the message names, a Location per PL component (v2-to-FHIR
HD[uri], HD[Organization], CX[Identifier], PL[Location]; departures in DEVIATIONS.md)."""

from __future__ import annotations

import pytest

from support.mapping import Json, one, resources, translate, v2

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0301 = "http://terminology.hl7.org/CodeSystem/v2-0301"
RFC3986 = "urn:ietf:rfc:3986"
UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def adt(cx4: str = "NORTHSIDE&1.2.3.4.5&ISO", pv1_3: str = "WARD7^712^A^NORTHSIDE",
        sender: str = "SYNTHADT|NORTHSIDE", control: str = "AUTH-1") -> bytes:
    """A synthetic ADT^A01 with the assigning authority and location under test."""
    return v2(
        f"MSH|^~\\&|{sender}|ISTHMUS|GATEWAY|20260401101500+0200||ADT^A01^ADT_A01"
        f"|{control}|P|2.5.1",
        "EVN|A01|20260401101500+0200",
        f"PID|1||NS-5521^^^{cx4}^MR||CANARYAUTH^Ida||19771103|F",
        f"PV1|1|I|{pv1_3}||||5150^CANARYDOC^Rae^^^^^^{cx4}",
    )


def by_ref(bundle: Json, reference: str) -> Json:
    return next(e["resource"] for e in bundle["entry"] if e["fullUrl"] == reference)


def full_url(bundle: Json, resource: Json) -> str:
    return str(next(e["fullUrl"] for e in bundle["entry"] if e["resource"] is resource))


# -- Identifier.system: the naming-system tables ------------------------------------------

@pytest.mark.parametrize(("cx4", "system"), [
    ("NORTHSIDE&1.2.3.4.5&ISO", "urn:oid:1.2.3.4.5"),  # the universal id wins
    ("&2.16.840.1.113883.4.1&ISO", "http://hl7.org/fhir/sid/us-ssn"),  # a known OID
    ("SSA", "http://hl7.org/fhir/sid/us-ssn"),  # a known namespace id
    ("USSSA", "http://hl7.org/fhir/sid/us-ssn"),
    ("NORTHSIDE", "urn:isthmus:naming-system:NORTHSIDE"),  # unknown: a stable URN
    ("NORTH SIDE", "urn:isthmus:naming-system:NORTH%20SIDE"),  # spaces percent-encoded
    (f"&{UUID}&UUID", f"urn:uuid:{UUID}"),
    ("&https://id.example.org/mrn&URI", "https://id.example.org/mrn"),
])
def test_identifier_system_is_a_uri_from_the_naming_system_tables(cx4: str, system: str
                                                                   ) -> None:
    patient = one(translate(adt(cx4=cx4)), "Patient")
    assert patient["identifier"][0]["system"] == system


# -- the assigning authority as an Organization --------------------------------------------

@pytest.mark.parametrize(("cx4", "identifiers"), [
    ("NORTHSIDE&1.2.3.4.5&ISO", [
        {"value": "NORTHSIDE", "system": "urn:isthmus:naming-system:NORTHSIDE"},
        {"value": "urn:oid:1.2.3.4.5", "system": RFC3986,
         "type": {"coding": [{"system": V2_0301, "code": "ISO"}]}}]),
    ("NORTHSIDE", [{"value": "NORTHSIDE", "system": "urn:isthmus:naming-system:NORTHSIDE"}]),
    (f"&{UUID}&UUID", [{"value": f"urn:uuid:{UUID}", "system": RFC3986,
                        "type": {"coding": [{"system": V2_0301, "code": "UUID"}]}}]),
    ("NORTHSIDE&N-77&L", [
        {"value": "NORTHSIDE", "system": "urn:isthmus:naming-system:NORTHSIDE"},
        {"value": "N-77", "type": {"coding": [{"system": V2_0301, "code": "L"}]}}]),
])
def test_assigning_authority_becomes_the_assigner_organization(cx4: str,
                                                               identifiers: list[Json]
                                                               ) -> None:
    bundle = translate(adt(cx4=cx4))
    patient = one(bundle, "Patient")
    organization = by_ref(bundle, patient["identifier"][0]["assigner"]["reference"])
    assert organization == {"resourceType": "Organization", "identifier": identifiers,
                            **({"id": organization["id"]} if "id" in organization else {})}


def test_one_organization_per_authority_in_a_message() -> None:
    bundle = translate(adt())  # PID-3 and PV1-7 (XCN-9) name the same authority
    patient, doctor = one(bundle, "Patient"), one(bundle, "Practitioner")
    assert doctor["identifier"][0]["assigner"] == {
        "reference": patient["identifier"][0]["assigner"]["reference"]}
    authorities = [o for o in resources(bundle, "Organization")
                   if o["identifier"][0]["value"] == "NORTHSIDE"]
    assert len(authorities) == 1  # MSH-4 names it too: one Organization, both views
    assert [i["value"] for i in authorities[0]["identifier"]] == [
        "NORTHSIDE", "urn:oid:1.2.3.4.5"]


@pytest.mark.parametrize("cx4", ["NORTHSIDE&1.2.3.4.5&ISO", "NORTHSIDE"])
def test_the_same_authority_is_the_same_organization_from_any_sender(cx4: str) -> None:
    first = translate(adt(cx4=cx4, sender="SYNTHADT|NORTHSIDE", control="A-1"))
    again = translate(adt(cx4=cx4, sender="OTHERAPP|SOUTHSIDE", control="B-7"))
    one_org = by_ref(first, one(first, "Patient")["identifier"][0]["assigner"]["reference"])
    same_org = by_ref(again, one(again, "Patient")["identifier"][0]["assigner"]["reference"])
    assert full_url(first, one_org) == full_url(again, same_org)
    request = next(e["request"] for e in first["entry"] if e["resource"] is one_org)
    assert request == {"method": "POST", "url": "Organization",
                       "ifNoneExist": "identifier=urn:isthmus:naming-system:NORTHSIDE|NORTHSIDE"}


# -- PL: a Location per component, each part of the next one sent above it -------------

@pytest.mark.parametrize(("pv1_3", "chain"), [
    ("WARD7", [("WARD7", "wa")]),
    ("WARD7^712^A^NORTHSIDE", [("A", "bd"), ("712", "ro"), ("WARD7", "wa"),
                               ("NORTHSIDE", "si")]),
    ("WARD7^712^^NORTHSIDE^^^WEST^3", [("712", "ro"), ("3", "lvl"), ("WARD7", "wa"),
                                       ("WEST", "bu"), ("NORTHSIDE", "si")]),
    ("^^^NORTHSIDE", [("NORTHSIDE", "si")]),
    ("^712^^^^^WEST", [("712", "ro"), ("WEST", "bu")]),
    ("^^B", [("B", "bd")]),
])
def test_pl_becomes_a_location_hierarchy(pv1_3: str, chain: list[tuple[str, str]]) -> None:
    bundle = translate(adt(pv1_3=pv1_3))
    location = by_ref(bundle, one(bundle, "Encounter")["location"][0]["location"]["reference"])
    found = []
    while True:
        coding = location["physicalType"]["coding"]
        assert coding[0]["system"] == \
            "http://terminology.hl7.org/CodeSystem/location-physical-type"
        found.append((location["name"], coding[0]["code"]))
        if "partOf" not in location:
            break
        location = by_ref(bundle, location["partOf"]["reference"])
    assert found == chain
    assert len(resources(bundle, "Location")) == len(chain)


def test_one_room_number_in_two_wards_is_two_rooms() -> None:
    first = translate(adt(pv1_3="WARD7^712^^NORTHSIDE"))
    other = translate(adt(pv1_3="WARD9^712^^NORTHSIDE"))
    room_a = by_ref(first, one(first, "Encounter")["location"][0]["location"]["reference"])
    room_b = by_ref(other, one(other, "Encounter")["location"][0]["location"]["reference"])
    assert room_a["name"] == room_b["name"] == "712"
    assert full_url(first, room_a) != full_url(other, room_b)
    resent = translate(adt(pv1_3="WARD7^712^^NORTHSIDE", control="AUTH-2"))
    again = one(resent, "Encounter")["location"][0]["location"]["reference"]
    assert again == full_url(first, room_a)  # the same room, message after message


@pytest.mark.parametrize(("field", "status"), [
    (3, "active"),  # assigned patient location
    (6, "completed"),  # prior patient location
    (11, "active"),  # temporary location
    (42, "reserved"),  # pending location
    (43, "completed"),  # prior temporary location
])
def test_every_pv1_location_field_refers_to_its_most_specific_location(field: int,
                                                                       status: str) -> None:
    fields = ["PV1", "1", "I"] + [""] * 50
    fields[field] = "WARD3^301^C^NORTHSIDE"
    bundle = translate(v2(*adt().decode().split("\r")[:3], "|".join(fields)))
    [entry] = one(bundle, "Encounter")["location"]
    assert entry["status"] == status
    bed = by_ref(bundle, entry["location"]["reference"])
    assert (bed["name"], bed["physicalType"]["coding"][0]["code"]) == ("C", "bd")


@pytest.mark.parametrize(("pv1_3", "identified"), [
    ("WARD3&9.8&ISO^301", {"WARD3": [{"value": "urn:oid:9.8", "system": RFC3986}]}),
    ("WARD3&9.8&ISO", {"WARD3": [{"value": "urn:oid:9.8", "system": RFC3986}]}),
    ("WARD3^301&9.9&ISO^C", {"301": [{"value": "urn:oid:9.9", "system": RFC3986}]}),
    ("WARD3&W-3&L^301", {}),  # a local universal id does not identify it
])
def test_a_pl_component_with_an_oid_identifies_its_location(pv1_3: str,
                                                            identified: dict[str, Json]
                                                            ) -> None:
    bundle = translate(adt(pv1_3=pv1_3))
    found = {loc["name"]: loc["identifier"] for loc in resources(bundle, "Location")
             if "identifier" in loc}
    assert found == identified


# -- MSH: the MessageHeader and its Organizations -------------------------------------------

def _msh(fields: dict[int, str]) -> bytes:
    msh = ["MSH", "^~\\&", "", "", "", "", "20260401101500+0200", "", "ADT^A01^ADT_A01",
           "MH-1", "P", "2.5.1"] + [""] * 14
    for number, text in fields.items():
        msh[number - 1] = text
    return v2("|".join(msh).rstrip("|"), *adt().decode().split("\r")[1:3])


@pytest.mark.parametrize(("fields", "path", "expected"), [
    ({3: "SYNTHADT"}, "source", {"name": "SYNTHADT",
                                 "endpoint": "urn:isthmus:naming-system:SYNTHADT"}),
    ({3: "SYNTHADT^1.2.3.9^ISO"}, "source", {"name": "SYNTHADT",
                                             "endpoint": "urn:oid:1.2.3.9"}),
    ({}, "source", {"endpoint": "urn:isthmus:naming-system:unknown"}),  # required
    ({4: "NORTHSIDE^1.2.3.4.5^ISO"}, "sender", ["NORTHSIDE", "urn:oid:1.2.3.4.5"]),
    ({6: "SOUTHSIDE"}, "destination", ["SOUTHSIDE"]),
    ({6: "SOUTHSIDE", 23: "South Health Inc."}, "destination", ["SOUTHSIDE"]),
    ({23: "South Health Inc."}, "destination", "South Health Inc."),
    ({22: "North Health Inc.^^NH-1"}, "responsible", "North Health Inc."),
    ({}, "eventCoding", {"system": "http://terminology.hl7.org/CodeSystem/v2-0003",
                         "code": "A01"}),
])
def test_msh_becomes_the_message_header(fields: dict[int, str], path: str,
                                        expected: object) -> None:
    bundle = translate(_msh(fields))
    header = one(bundle, "MessageHeader")
    if path in ("source", "eventCoding"):
        assert header[path] == expected
        return
    reference = (header[path][0]["receiver"] if path == "destination" else header[path])
    organization = by_ref(bundle, reference["reference"])
    if isinstance(expected, list):
        assert [i["value"] for i in organization["identifier"]] == expected
    else:
        assert organization["name"] == expected


def test_msh_facilities_are_part_of_the_responsible_organizations() -> None:
    bundle = translate(_msh({4: "NORTHSIDE", 6: "SOUTHSIDE", 22: "North Health Inc.^^NH-1",
                             23: "South Health Inc."}))
    header = one(bundle, "MessageHeader")
    sender = by_ref(bundle, header["sender"]["reference"])
    receiver = by_ref(bundle, header["destination"][0]["receiver"]["reference"])
    assert by_ref(bundle, sender["partOf"]["reference"]) == by_ref(
        bundle, header["responsible"]["reference"])
    assert by_ref(bundle, sender["partOf"]["reference"])["name"] == "North Health Inc."
    assert receiver["identifier"][0]["value"] == "SOUTHSIDE"
    assert by_ref(bundle, receiver["partOf"]["reference"])["name"] == "South Health Inc."
