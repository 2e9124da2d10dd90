"""SMART scopes: v2 and v1 forms, what each permits, what is granted, what is malformed.

Rows follow SMART App Launch 2.x §Scopes for requesting FHIR resources: c = create,
r = read/vread/instance history, u = update/patch, d = delete, s = search/type history.
"""

from __future__ import annotations

from itertools import combinations, product

import pytest

from gateway.policy.scopes import Scope, ScopeDenied, ScopeError, ScopeSet, grant, parse_scope

# The spec's table, written out independently of the code under test.
LETTER = {"read": "r", "vread": "r", "history-instance": "r", "search": "s",
          "history-type": "s", "create": "c", "update": "u", "patch": "u", "delete": "d"}
SUBSETS = ["".join(c) for n in range(1, 6) for c in combinations("cruds", n)]
V1 = {"read": "rs", "write": "cud", "*": "cruds"}
FORMS = [(perm, perm) for perm in SUBSETS] + list(V1.items())
RESOURCE_TYPES = ["Patient", "Observation"]


@pytest.mark.parametrize(("context", "scope_type", "form", "interaction", "resource_type"),
                         list(product(["patient", "user", "system"], ["*", "Patient"],
                                      [f for f, _ in FORMS], [*LETTER, "history"],
                                      RESOURCE_TYPES)))
def test_permits_matrix(context: str, scope_type: str, form: str, interaction: str,
                        resource_type: str) -> None:
    letters = dict(FORMS)[form]
    scopes = ScopeSet.parse(f"{context}/{scope_type}.{form}")
    needed = "rs" if interaction == "history" else LETTER[interaction]
    expected = scope_type in ("*", resource_type) and all(n in letters for n in needed)
    assert scopes.permits(interaction, resource_type) is expected


@pytest.mark.parametrize(("scope", "interaction", "resource_type", "expected"), [
    ("patient/Observation.rs", "read", "Observation", True),
    ("patient/Observation.rs", "search", "Observation", True),
    ("patient/Observation.rs", "create", "Observation", False),
    ("patient/Observation.rs", "read", "Patient", False),
    ("patient/Observation.r", "search", "Observation", False),
    ("patient/Observation.s", "read", "Observation", False),
    ("user/Appointment.cu", "create", "Appointment", True),
    ("user/Appointment.cu", "update", "Appointment", True),
    ("user/Appointment.cu", "patch", "Appointment", True),
    ("user/Appointment.cu", "delete", "Appointment", False),
    ("system/*.d", "delete", "Slot", True),
    ("system/*.read", "vread", "Encounter", True),
    ("system/*.read", "history-type", "Encounter", True),
    ("system/*.read", "update", "Encounter", False),
    ("system/Patient.write", "create", "Patient", True),
    ("system/Patient.write", "read", "Patient", False),
    ("system/Patient.*", "delete", "Patient", True),
    ("system/Observation.rs?category=laboratory", "search", "Observation", True),
    ("openid launch/patient offline_access", "read", "Patient", False),
    ("", "read", "Patient", False),
])
def test_permits_rows(scope: str, interaction: str, resource_type: str, expected: bool) -> None:
    assert ScopeSet.parse(scope).permits(interaction, resource_type) is expected


def test_unknown_interaction_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown interaction"):
        ScopeSet.parse("system/*.cruds").permits("operation", "Patient")


@pytest.mark.parametrize(("text", "expected"), [
    ("system/Patient.rs", Scope("system", "Patient", frozenset("rs"))),
    ("patient/*.cruds", Scope("patient", "*", frozenset("cruds"))),
    ("user/Observation.read", Scope("user", "Observation", frozenset("rs"))),
    ("user/Observation.write", Scope("user", "Observation", frozenset("cud"))),
    ("system/*.*", Scope("system", "*", frozenset("cruds"))),
    ("patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/"
     "observation-category|laboratory",
     Scope("patient", "Observation", frozenset("rs"), (
         ("category", "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"),))),
    ("system/Observation.s?status=final&category=vital-signs",
     Scope("system", "Observation", frozenset("s"),
           (("category", "vital-signs"), ("status", "final")))),
    ("system/DocumentReference.r?type=a%26b", Scope(
        "system", "DocumentReference", frozenset("r"), (("type", "a&b"),))),
])
def test_parse_scope(text: str, expected: Scope) -> None:
    scope = parse_scope(text)
    assert scope == expected
    assert parse_scope(expected.to_text()) == expected


@pytest.mark.parametrize(("v1", "v2"), [
    ("patient/*.read", "patient/*.rs"),
    ("user/Patient.write", "user/Patient.cud"),
    ("system/Slot.*", "system/Slot.cruds"),
    ("system/Observation.rs?category=laboratory", "system/Observation.rs?category=laboratory"),
])
def test_to_text_writes_v2(v1: str, v2: str) -> None:
    scope = parse_scope(v1)
    assert scope is not None and scope.to_text() == v2


@pytest.mark.parametrize("text", ["openid", "fhirUser", "launch", "launch/patient",
                                  "launch/encounter", "offline_access", "online_access",
                                  "profile"])
def test_non_resource_scopes_are_not_resource_scopes(text: str) -> None:
    assert parse_scope(text) is None


@pytest.mark.parametrize("text", [
    "patient/Patient.rsc",   # out of order
    "patient/Patient.rr",    # repeated
    "patient/Patient.",      # no permissions
    "patient/Patient",       # no dot
    "patient/patient.rs",    # not a FHIR type name
    "patient/Patient.x",     # not a permission letter
    "patient/Patient.reads",
    "system/.rs",
    "system/**.rs",
    "user/Patient.read?x=1",  # v1 takes no constraints
    "system/*.rs?category",   # no value
    "system/*.rs?=x",         # no name
    "system/*.rs?category=",  # empty value
    "system/Patient.cruds?a=1&",
    "system/Pat\u00e9.rs",    # not ASCII
    "system/Patient.rs" + "?a=b" * 300,  # too long
])
def test_malformed_resource_scope_raises(text: str) -> None:
    with pytest.raises(ScopeError):
        parse_scope(text)
    with pytest.raises(ScopeError):
        ScopeSet.parse(text)


@pytest.mark.parametrize(("requested", "allowed", "granted"), [
    ("system/Patient.rs", ["system/Patient.r"], ["system/Patient.r"]),
    ("system/*.rs", ["system/Patient.rs", "system/Slot.rs"],
     ["system/Patient.rs", "system/Slot.rs"]),
    ("system/*.read", ["system/Patient.cruds"], ["system/Patient.rs"]),
    ("system/Patient.*", ["system/*.rs"], ["system/Patient.rs"]),
    ("system/Patient.rs", ["system/*.*"], ["system/Patient.rs"]),
    ("patient/*.rs", ["system/*.rs"], []),
    ("system/Observation.rs", ["system/Observation.rs?category=laboratory"],
     ["system/Observation.rs?category=laboratory"]),
    ("system/Observation.rs?status=final", ["system/Observation.r?category=laboratory"],
     ["system/Observation.r?category=laboratory&status=final"]),
    ("system/*.rs system/Patient.r", ["system/*.rs"], ["system/*.rs"]),
    ("system/Patient.r system/Patient.s", ["system/*.cruds"], ["system/Patient.rs"]),
    ("system/Patient.rsx bogus/x system/Slot.rs system/", ["system/*.rs"], ["system/Slot.rs"]),
    ("openid system/Slot.rs offline_access", ["system/*.rs", "openid"],
     ["system/Slot.rs", "openid"]),
    ("", ["system/*.rs"], []),
    ("system/*.rs", [], []),
    ("system/Slot.rs user/Patient.r system/Appointment.rs patient/Observation.rs",
     ["system/*.rs", "user/*.rs", "patient/*.rs"],
     ["patient/Observation.rs", "user/Patient.r", "system/Appointment.rs", "system/Slot.rs"]),
])
def test_grant_is_the_intersection(requested: str, allowed: list[str],
                                   granted: list[str]) -> None:
    assert grant(requested, allowed) == granted


def test_grant_order_does_not_depend_on_request_order() -> None:
    allowed = ["system/*.cruds"]
    assert grant("system/Slot.r system/Appointment.s", allowed) == grant(
        "system/Appointment.s system/Slot.r", allowed)


def test_malformed_allowed_scope_is_a_configuration_error() -> None:
    with pytest.raises(ScopeError):
        grant("system/*.rs", ["system/*.sr"])


def test_constraints_for_gives_the_alternatives() -> None:
    scopes = ScopeSet.parse("patient/Observation.rs?category=laboratory "
                            "patient/Observation.rs?category=vital-signs "
                            "patient/Observation.r")
    assert scopes.constraints_for("search", "Observation") == (
        (("category", "laboratory"),), (("category", "vital-signs"),))
    assert scopes.constraints_for("read", "Observation") == ()  # the unconstrained .r
    with pytest.raises(ScopeDenied):
        scopes.constraints_for("create", "Observation")
    with pytest.raises(ScopeDenied):
        scopes.constraints_for("search", "Patient")


@pytest.mark.parametrize(("scopes", "resource_type", "expected"), [
    ("patient/Observation.rs system/Patient.rs", "Observation", True),
    ("patient/Observation.rs system/Patient.rs", "Patient", False),
    ("patient/Observation.rs system/Patient.rs", "Slot", False),
    ("patient/*.rs user/Observation.r", "Observation", False),
    ("patient/*.rs user/Observation.r", "Patient", True),
    ("patient/*.read", "Encounter", True),
])
def test_is_patient_context(scopes: str, resource_type: str, expected: bool) -> None:
    assert ScopeSet.parse(scopes).is_patient_context(resource_type) is expected


def test_one_scope_set_asked_again_answers_as_a_fresh_one() -> None:
    """A ScopeSet remembers what it permits per (interaction, type): every question,
    asked in any order and again, answers as a newly parsed set would."""
    text = ("patient/Observation.rs?category=laboratory patient/Observation.r "
            "system/Patient.rs user/Appointment.cu")
    kept = ScopeSet.parse(text)
    questions = list(product([*LETTER, "history", "vread", "patch"],
                             ["Observation", "Patient", "Appointment", "Slot"]))

    def answers(scopes: ScopeSet, interaction: str, type_: str) -> tuple[object, ...]:
        try:
            constraints: object = scopes.constraints_for(interaction, type_)
        except ScopeDenied:
            constraints = "denied"
        return (scopes.permits(interaction, type_), constraints,
                scopes.is_patient_context(type_))

    for _ in range(2):
        for interaction, type_ in questions + questions[::-1]:
            assert answers(kept, interaction, type_) == answers(
                ScopeSet.parse(text), interaction, type_), (interaction, type_)
    # What it remembers is no part of its value, and a bad interaction is still refused.
    assert kept == ScopeSet.parse(text) and hash(kept) == hash(ScopeSet.parse(text))
    with pytest.raises(ValueError, match="unknown interaction"):
        kept.permits("", "Observation")


def test_scope_set_text_round_trips() -> None:
    text = "patient/Observation.rs?category=laboratory system/*.cruds user/Patient.r"
    assert ScopeSet.parse(ScopeSet.parse(text).to_text()) == ScopeSet.parse(text)
    assert ScopeSet.parse(text).to_text() == text
