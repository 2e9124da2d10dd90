"""Minimum-necessary profiles: only the task's elements leave, required ones always do."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.policy.profiles import (
    SUBSETTED_CODE,
    SUBSETTED_SYSTEM,
    Profile,
    ProfileDenied,
    ProfileError,
    load_profiles,
)

CONFIG: dict[str, dict[str, tuple[str, ...]]] = {
    "scheduling": {
        "Patient": ("name", "telecom"),
        "Appointment": ("start", "end"),
        "Slot": ("*",),
    },
    "results": {
        "Observation": ("value", "effective", "subject"),
        "MedicationRequest": (),
    },
}
PROFILES = load_profiles(CONFIG)
SCHEDULING, RESULTS = PROFILES["scheduling"], PROFILES["results"]

PATIENT: dict[str, Any] = {
    "resourceType": "Patient", "id": "p1", "meta": {"versionId": "2"},
    "name": [{"family": "Quixotefake"}], "telecom": [{"system": "phone", "value": "555"}],
    "birthDate": "1985-02-14", "_birthDate": {"extension": []}, "gender": "female",
}
APPOINTMENT: dict[str, Any] = {
    "resourceType": "Appointment", "id": "a1", "status": "booked",
    "start": "2026-01-05T09:00:00Z", "end": "2026-01-05T09:30:00Z", "description": "x",
    "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}],
}
OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation", "id": "o1", "status": "final", "_status": {"id": "s"},
    "code": {"text": "glucose"}, "valueQuantity": {"value": 5.4},
    "effectiveDateTime": "2026-01-05", "subject": {"reference": "Patient/p1"},
    "note": [{"text": "x"}], "interpretation": [{"text": "N"}],
}
MEDICATION_REQUEST: dict[str, Any] = {
    "resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
    "medicationCodeableConcept": {"text": "x"}, "subject": {"reference": "Patient/p1"},
    "note": [{"text": "x"}],
}


def _subsetted_tags(resource: dict[str, Any]) -> list[Any]:
    return [t for t in resource.get("meta", {}).get("tag", [])
            if t.get("system") == SUBSETTED_SYSTEM and t.get("code") == SUBSETTED_CODE]


@pytest.mark.parametrize(("profile", "resource", "kept"), [
    # Listed elements, plus resourceType/id/meta.
    (SCHEDULING, PATIENT, {"resourceType", "id", "meta", "name", "telecom"}),
    # Appointment.status and participant are required (1..1, 1..*), so they stay.
    (SCHEDULING, APPOINTMENT,
     {"resourceType", "id", "meta", "status", "start", "end", "participant"}),
    # Choice base names ('value', 'effective'); required status (with _status) and code.
    (RESULTS, OBSERVATION, {"resourceType", "id", "meta", "status", "_status", "code",
                            "valueQuantity", "effectiveDateTime", "subject"}),
    # Nothing listed: only what R4 requires, a required choice (medication[x]) included.
    (RESULTS, MEDICATION_REQUEST, {"resourceType", "id", "meta", "status", "intent",
                                   "medicationCodeableConcept", "subject"}),
])
def test_filter_keeps_listed_and_required_elements_and_tags_subsetted(
        profile: Profile, resource: dict[str, Any], kept: set[str]) -> None:
    before = dict(resource)
    out = profile.filter(resource)
    assert set(out) == kept
    assert len(_subsetted_tags(out)) == 1
    assert resource == before  # the stored resource is not modified


def test_subsetted_tag_is_not_duplicated_and_other_tags_stay() -> None:
    tagged = dict(PATIENT, meta={"tag": [
        {"system": SUBSETTED_SYSTEM, "code": SUBSETTED_CODE},
        {"system": "urn:example", "code": "other"}]})
    out = SCHEDULING.filter(tagged)
    assert len(_subsetted_tags(out)) == 1
    assert {"system": "urn:example", "code": "other"} in out["meta"]["tag"]
    assert len(tagged["meta"]["tag"]) == 2


def test_nothing_removed_means_no_tag() -> None:
    resource = {"resourceType": "Patient", "id": "p1", "name": [{"family": "x"}]}
    out = SCHEDULING.filter(resource)
    assert out == resource and "meta" not in out


@pytest.mark.parametrize(("resource_type", "whole"), [
    ("Slot", True), ("Patient", False), ("Encounter", False)])
def test_is_whole(resource_type: str, whole: bool) -> None:
    assert SCHEDULING.is_whole(resource_type) is whole


def test_whole_resource_type_passes_through_the_same_object() -> None:
    slot = {"resourceType": "Slot", "id": "s1", "status": "free", "comment": "x"}
    assert SCHEDULING.filter(slot) is slot


@pytest.mark.parametrize(("resource_type", "allowed"), [
    ("Patient", True), ("Slot", True), ("Observation", False), ("Encounter", False)])
def test_types_not_listed_are_refused(resource_type: str, allowed: bool) -> None:
    assert SCHEDULING.allows_type(resource_type) is allowed
    if not allowed:
        with pytest.raises(ProfileDenied):
            SCHEDULING.filter({"resourceType": resource_type, "id": "x"})


@pytest.mark.parametrize(("config", "named"), [
    ({"p": {"Pateint": ("name",)}}, ("p", "Pateint", None)),
    ({"p": {"HumanName": ("family",)}}, ("p", "HumanName", None)),
    ({"p": {"Patient": ("name", "birthdate")}}, ("p", "Patient", "birthdate")),
    ({"p": {"Patient": ("name.family",)}}, ("p", "Patient", "name.family")),
    ({"p": {"Observation": ("valueFoo",)}}, ("p", "Observation", "valueFoo")),
    ({"p": {"Patient": ("_birthDate",)}}, ("p", "Patient", "_birthDate")),
    ({"q": {"Slot": ("*", "status")}}, ("q", "Slot", "*")),
])
def test_unknown_type_or_element_in_config_is_named(
        config: dict[str, dict[str, tuple[str, ...]]],
        named: tuple[str, str, str | None]) -> None:
    with pytest.raises(ProfileError) as caught:
        load_profiles(config)
    profile, resource_type, element = named
    assert (caught.value.profile, caught.value.resource_type, caught.value.element) == named
    assert profile in str(caught.value) and resource_type in str(caught.value)
    if element:
        assert element in str(caught.value)


@pytest.mark.parametrize(("resource_type", "elements", "present", "absent"), [
    ("Patient", ("deceased",), {"deceasedBoolean"}, set()),
    ("Patient", ("deceased",), {"deceasedDateTime"}, set()),
    ("Patient", ("deceasedBoolean",), {"deceasedBoolean"}, {"deceasedDateTime"}),
    ("Patient", ("multipleBirth",), {"multipleBirthInteger"}, set()),
    ("Encounter", ("class",), {"class"}, {"period"}),  # a Python keyword as element
])
def test_choice_base_names_match_their_typed_elements(
        resource_type: str, elements: tuple[str, ...], present: set[str],
        absent: set[str]) -> None:
    profile = Profile("t", {resource_type: elements})
    resource: dict[str, Any] = {"resourceType": resource_type, "id": "x"}
    resource |= {name: "v" for name in present | absent}
    out = profile.filter(resource)
    assert present <= set(out)
    assert not absent & set(out)


@pytest.mark.parametrize(("resource_type", "roots", "permitted"), [
    ("Patient", frozenset({"telecom"}), True),  # phone, email
    ("Patient", frozenset({"name"}), True),  # name, family, given
    ("Patient", frozenset({"birthDate"}), False),  # birthdate would reveal it by matching
    ("Patient", frozenset({"name", "birthDate"}), False),
    ("Patient", frozenset({"id"}), True),  # _id
    ("Patient", frozenset({"meta"}), True),  # _lastUpdated
    ("Patient", frozenset({"_id"}), True),
    ("Patient", frozenset({"_lastUpdated"}), True),
    ("Observation", frozenset({"code"}), True),  # required (1..1), so always visible
    ("Observation", frozenset({"value"}), True),
    ("Observation", frozenset({"valueQuantity"}), True),
    ("Observation", frozenset({"subject"}), True),
    ("Observation", frozenset({"performer"}), False),
    ("Appointment", frozenset({"status"}), True),  # required, always visible
    ("Slot", frozenset({"schedule", "comment"}), True),  # whole resource
    ("Encounter", frozenset({"id"}), False),  # type not listed
])
def test_permits_search_only_on_visible_elements(
        resource_type: str, roots: frozenset[str], permitted: bool) -> None:
    profile = RESULTS if resource_type == "Observation" else SCHEDULING
    assert profile.permits_search(resource_type, roots) is permitted


def test_choice_base_search_needs_every_variant_visible() -> None:
    profile = Profile("t", {"Observation": ("valueQuantity",)})
    assert profile.permits_search("Observation", frozenset({"valueQuantity"}))
    assert not profile.permits_search("Observation", frozenset({"value"}))


def test_purpose_of_use_is_the_profile_name() -> None:
    assert SCHEDULING.purpose_of_use == "scheduling"
