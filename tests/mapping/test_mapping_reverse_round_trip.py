"""v2 -> FHIR -> v2 per message type (issue 14): each listed field of the original message
comes back, byte for byte, after `translate` and the Reverser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from functools import cache
from pathlib import Path

import pytest

from conftest import message as fixture
from gateway.hl7.message import Message, parse_message
from gateway.mapping.errors import TableErrors
from gateway.mapping.tables import SHIPPED
from gateway.mapping.to_v2 import Reverser
from support.mapping import translate, v2

NOW = datetime(2026, 3, 22, 12, 0, 0, tzinfo=timezone(timedelta(hours=1)))
PATIENT = ["PID-3", "PID-5", "PID-7", "PID-8"]


@cache
def reverser() -> Reverser:
    return Reverser.load()


@cache
def round_trip(name: str) -> tuple[Message, Message]:
    """The original message and the one the Reverser makes from its Bundle."""
    original = parse_message(fixture(name))
    [text] = reverser().to_v2(translate(fixture(name)), control_id="RT", now=NOW)
    return original, parse_message(text.encode())


def assert_kept(name: str, paths: list[str]) -> None:
    original, back = round_trip(name)
    for path in paths:
        assert back.get_raw(path) == original.get_raw(path) != "", path


# -- ADT^A01 from an Encounter: the visit with its patient ---------------------------------

def test_an_encounter_becomes_an_a01_with_pid_and_pv1() -> None:
    _, back = round_trip("reverse_adt_a01.hl7")
    assert back.get_raw("MSH-9") == "ADT^A01^ADT_A01"
    assert back.get("EVN-1") == "A01"
    assert [s.id for s in back.segments()] == ["MSH", "EVN", "PID", "PV1"]


@pytest.mark.parametrize("path", [*PATIENT, "PID-11", "PID-13", "PV1-2", "PV1-3", "PV1-19",
                                  "PV1-44"])
def test_adt_round_trip_keeps(path: str) -> None:
    assert_kept("reverse_adt_a01.hl7", [path])


@pytest.mark.parametrize("path", ["PID-11(1).1", "PID-11(1).2", "PID-13(1).5", "PID-13(1).6",
                                  "PID-13(1).7", "PID-13(2).5", "PV1-3.1", "PV1-3.2",
                                  "PV1-3.3", "PV1-3.4", "PV1-3.7", "PV1-3.8"])
def test_street_lines_country_code_and_location_parts_stay_in_their_components(
        path: str) -> None:
    assert_kept("reverse_adt_a01.hl7", [path])


@pytest.mark.parametrize("location", [
    "WARD4E^^B^SYNTHHOSP", "^408^^SYNTHHOSP", "WARD4E^^^SYNTHHOSP", "^^^SYNTHHOSP",
    "WARD4E^408", "^^^SYNTHHOSP^^^MAIN^3", "ER^^^^^^^^Emergency room",
    "WARD4E^408^B^SYNTHHOSP&1.2.3.4.5&ISO"])
def test_any_part_of_a_location_comes_back_where_it_was_sent(location: str) -> None:
    """Each Location of the chain is read back by the table that made it (a floor is not a
    room), whichever components were sent."""
    message = v2("MSH|^~\\&|A|F|||20260322110000+0100||ADT^A01^ADT_A01|L1|P|2.5.1",
                 "EVN|A01", "PID|1||M1^^^H^MR||Ng^Ann", f"PV1|1|I|{location}")
    [text] = reverser().to_v2(translate(message), control_id="L", now=NOW)
    assert parse_message(text.encode()).get_raw("PV1-3") == location


@pytest.mark.parametrize(("status", "event", "expected"), [
    ("in-progress", None, "ADT^A01^ADT_A01"), ("finished", None, "ADT^A03^ADT_A01"),
    ("in-progress", "A08", "ADT^A08^ADT_A01"), ("planned", "A04", "ADT^A04^ADT_A01")])
def test_the_encounter_status_or_the_event_chooses_the_message(
        status: str, event: str | None, expected: str) -> None:
    encounter = {"resourceType": "Encounter", "status": status, "class": {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}}
    [text] = reverser().to_v2(encounter, event=event, control_id="E", now=NOW)
    message = parse_message(text.encode())
    assert message.get_raw("MSH-9") == expected
    assert message.get("PV1-2") == "I"


# -- ORU^R01: every OBX, whatever its value type ---------------------------------------------

RESULTS = 9


def test_every_obx_comes_back_in_order() -> None:
    original, back = round_trip("reverse_oru_r01_types.hl7")
    assert [s.id for s in back.segments()] == ["MSH", "PID", "ORC", "OBR", *["OBX"] * RESULTS]
    assert [back.get(f"OBX[{n}]-1") for n in range(1, RESULTS + 1)] == \
        [original.get(f"OBX[{n}]-1") for n in range(1, RESULTS + 1)]


@pytest.mark.parametrize("occurrence", range(1, RESULTS + 1))
def test_results_round_trip_keeps_obx_3_5_11(occurrence: int) -> None:
    assert_kept("reverse_oru_r01_types.hl7",
                [f"OBX[{occurrence}]-{n}" for n in (3, 5, 11)])


@pytest.mark.parametrize("occurrence", [1, 9])
def test_results_round_trip_keeps_units_and_ranges(occurrence: int) -> None:
    assert_kept("reverse_oru_r01_types.hl7",
                [f"OBX[{occurrence}]-{n}" for n in (6, 7, 8)])


@pytest.mark.parametrize(("occurrence", "value_type"), [
    (1, "NM"), (2, "ST"), (3, "CWE"), (4, "SN"), (6, "DT"), (7, "TM")])
def test_value_types_with_one_fhir_form_come_back(occurrence: int, value_type: str) -> None:
    _, back = round_trip("reverse_oru_r01_types.hl7")
    assert back.get(f"OBX[{occurrence}]-2") == value_type


@pytest.mark.parametrize("obx", [
    "OBX|1|SN|5048-4^ANA titer^LN||>^80|{titer}^titer^UCUM|||||F",
    "OBX|1|SN|2093-3^Cholesterol^LN||<=^5|mmol/L^mmol/L^UCUM|||||F",
    "OBX|1|SN|2093-3^Cholesterol^LN||^10^-^20|mmol/L^mmol/L^UCUM|||||F",
    "OBX|1|SN|5048-4^ANA titer^LN||^1^:^128||||||F",
    "OBX|1|SN|20454-5^Protein^LN||^2^+||||||C",
    "OBX|1|NM|2345-7^Glucose^LN||5.5|mmol/L^mmol/L^UCUM|3.9-5.5|H|||F",
    "OBX|1|NM|2345-7^Glucose^LN||5||||||F",
    "OBX|1|CWE|600-7^Culture^LN||3092008^Staphylococcus aureus^SCT||||||F",
])
def test_each_value_form_comes_back_as_sent(obx: str) -> None:
    """A comparator, a range, a ratio and a grade come back in their SN form with the
    units, not as the bare number the NM row would write."""
    message = v2("MSH|^~\\&|L|F|||20260322110000+0100||ORU^R01^ORU_R01|O1|P|2.5.1",
                 "PID|1||M1^^^H^MR||Ng^Ann", "OBR|1|P1|F1|24323-8^Panel^LN", obx)
    [text] = reverser().to_v2(translate(message), control_id="O", now=NOW)
    assert next(s for s in text.split("\r") if s.startswith("OBX|")) == obx


def test_results_round_trip_keeps_the_patient_order_and_report() -> None:
    assert_kept("reverse_oru_r01_types.hl7",
                [*PATIENT, "ORC-2", "ORC-3", "OBR-2", "OBR-3", "OBR-4", "OBR-7", "OBR-22"])


# -- SIU^S12: the appointment with every AIS, AIL and AIP ------------------------------------

def test_an_appointment_sends_an_ail_and_an_aip_per_participant() -> None:
    _, back = round_trip("reverse_siu_s12.hl7")
    assert [s.id for s in back.segments()] == ["MSH", "SCH", "PID", "RGS", "AIS", "AIL", "AIP"]


@pytest.mark.parametrize("path", [
    "SCH-1", "SCH-2", "SCH-7", "SCH-8", "SCH-9", "SCH-11", "SCH-25", "PID-3", "PID-5",
    "AIS-3", "AIS-4", "AIS-7", "AIL-3", "AIL-4", "AIL-12", "AIP-3", "AIP-4", "AIP-12"])
def test_appointment_round_trip_keeps(path: str) -> None:
    assert_kept("reverse_siu_s12.hl7", [path])


def test_an_aip_participant_is_not_also_an_sch_contact() -> None:
    _, back = round_trip("reverse_siu_s12.hl7")
    for number in (12, 16, 20):
        assert back.get_raw(f"SCH-{number}") == "", number


def test_two_practitioners_give_two_aips_numbered_in_order() -> None:
    message = v2("MSH|^~\\&|S|F|||20260322110000+0100||SIU^S12^SIU_S12|S1|P|2.5.1",
                 "SCH|P1|F1", "PID|1||M1^^^H^MR||Ng^Ann", "RGS|1",
                 "AIS|1||99213^Office visit^CPT",
                 "AIP|1||5501^DOCTOR^Dana|ATND^Attending^HL70443",
                 "AIP|2||5502^NURSE^Noor|NRS^Nurse^HL70443")
    [text] = reverser().to_v2(translate(message), control_id="S", now=NOW)
    back = parse_message(text.encode())
    assert [back.get(f"AIP[{n}]-1") for n in (1, 2)] == ["1", "2"]
    assert [back.get_raw(f"AIP[{n}]-3") for n in (1, 2)] == ["5501^DOCTOR^Dana",
                                                             "5502^NURSE^Noor"]
    assert [s.id for s in back.segments()].count("AIL") == 0


# -- VXU^V04: an Immunization ----------------------------------------------------------------

def test_an_immunization_becomes_a_vxu() -> None:
    _, back = round_trip("reverse_vxu_v04.hl7")
    assert back.get_raw("MSH-9") == "VXU^V04^VXU_V04"
    assert [s.id for s in back.segments()] == ["MSH", "PID", "ORC", "RXA", "RXR"]


@pytest.mark.parametrize("path", [*PATIENT, "ORC-1", "ORC-3", "RXA-1", "RXA-2", "RXA-3",
                                  "RXA-5", "RXA-6", "RXA-7", "RXA-15", "RXA-16", "RXA-17",
                                  "RXA-20", "RXR-1", "RXR-2"])
def test_immunization_round_trip_keeps(path: str) -> None:
    assert_kept("reverse_vxu_v04.hl7", [path])


# -- RDE^O11: the encoded medication order ---------------------------------------------------

@pytest.mark.parametrize("path", [*PATIENT, "ORC-1", "ORC-2", "ORC-3", "RXE-2", "RXE-3",
                                  "RXE-5", "RXE-10", "RXE-11", "RXE-12"])
def test_medication_order_round_trip_keeps(path: str) -> None:
    assert_kept("reverse_rde_o11.hl7", [path])


# -- bad outbound tables -----------------------------------------------------------------------

@pytest.mark.parametrize(("source", "message"), [
    ("participant[actor=Flag]", "cannot refer to a Flag"),
    ("participant[nope=Location]", "participant[nope=Location]"),
    ("participant[status=Location]", "not a Reference"),
])
def test_a_bad_per_element_source_is_reported(tmp_path: Path, source: str,
                                              message: str) -> None:
    site = tmp_path / "site"
    (site / "outbound").mkdir(parents=True)
    layout = (SHIPPED / "outbound" / "SIU_S12.csv").read_text()
    (site / "outbound" / "SIU_S12.csv").write_text(
        layout.replace("participant[actor=Practitioner]", source))
    shutil.copy(SHIPPED / "outbound.csv", site / "outbound.csv")
    with pytest.raises(TableErrors) as caught:
        Reverser.load(SHIPPED, site)
    assert "SIU_S12.csv:7:" in str(caught.value) and message in str(caught.value)


IMMUNIZATION = {"resourceType": "Immunization", "status": "completed",
                "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx",
                                            "code": "08"}]},
                "occurrenceDateTime": "2026-03-20T10:00:00+01:00",
                "doseQuantity": {"value": 0.5, "unit": "mL"}}


def test_rxa_4_is_the_start_when_fhir_has_no_end_and_rxr_is_left_out_without_a_route(
        ) -> None:
    [text] = reverser().to_v2(IMMUNIZATION, control_id="V", now=NOW)
    message = parse_message(text.encode())
    assert message.get("RXA-3") == message.get("RXA-4") == "20260320100000+0100"
    assert [s.id for s in message.segments()] == ["MSH", "ORC", "RXA"]


def test_an_immunization_translates_to_a_complete_vxu_on_the_command_line(
        tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(translate(fixture("reverse_vxu_v04.hl7"))))
    result = subprocess.run([sys.executable, "-m", "gateway", "translate", "--to", "hl7",
                             str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    segments = result.stdout.replace("\n", "\r").split("\r")
    assert next(s for s in segments if s.startswith("RXA|")).startswith(
        "RXA|0|1|20260320100000+0100|20260320100000+0100|08^")


@pytest.mark.parametrize(("fixed", "message"), [
    ("4={PID-3}", "PID-3 is not a field of RXA"), ("4={RXA-99}", "RXA-99 is not a field"),
    ("4={RXA}", "unknown {RXA}")])
def test_a_bad_field_copy_is_reported(tmp_path: Path, fixed: str, message: str) -> None:
    site = tmp_path / "site"
    (site / "outbound").mkdir(parents=True)
    layout = (SHIPPED / "outbound" / "VXU_V04.csv").read_text()
    (site / "outbound" / "VXU_V04.csv").write_text(layout.replace("4={RXA-3}", fixed))
    with pytest.raises(TableErrors) as caught:
        Reverser.load(SHIPPED, site)
    assert "VXU_V04.csv:5:" in str(caught.value) and message in str(caught.value)
