"""Caller matching, pure: the rules of mappings/agent/matching.csv, a site's override,
and a bad table refused with its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.agent.matching import Claim, MatchingRules, patient_matches
from gateway.mapping.errors import TableErrors
from support.cli import isthmus

RULES = MatchingRules.load()
PATIENT = {"resourceType": "Patient", "birthDate": "1980-02-14",
           "name": [{"family": "Ñúñez-O'Brien", "given": ["Zoë", "Q"]}],
           "telecom": [{"system": "email", "value": "x@example.org"},
                       {"system": "phone", "value": "+1 (617) 555-0142"}],
           "address": [{"postalCode": "02134-1234"}],
           "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789"},
                          {"type": {"coding": [{"code": "MR"}]}, "value": "MRN 700001"}]}


@pytest.mark.parametrize(("said", "normalised"), [
    ("NUNEZ OBRIEN", "nunezobrien"), ("ñúñez-o'brien", "nunezobrien"),
    ("Nunez.Obrien", "nunezobrien")])
def test_names_ignore_case_accents_hyphens_and_apostrophes(said: str, normalised: str) -> None:
    assert RULES.name(said) == normalised


@pytest.mark.parametrize(("said", "e164"), [
    ("(617) 555-0142", "+16175550142"), ("617.555.0142", "+16175550142"),
    ("1 617 555 0142", "+16175550142"), ("+44 20 7946 0958", "+442079460958"),
    ("555-0142", None), ("", None)])
def test_phones_become_e164(said: str, e164: str | None) -> None:
    assert RULES.phone(said) == e164


@pytest.mark.parametrize(("said", "iso"), [
    ("1980-02-14", "1980-02-14"), ("02/14/1980", "1980-02-14"), ("19800214", "1980-02-14"),
    ("14 February 1980", "1980-02-14"), ("February 14, 1980", "1980-02-14"),
    ("1980-02-30", None), ("yesterday", None)])
def test_dates_in_the_tables_forms(said: str, iso: str | None) -> None:
    assert RULES.date(said) == iso


@pytest.mark.parametrize(("second", "matches"), [
    (("phone", "+16175550142"), True), (("phone", "+16175550000"), False),
    (("zip", "02134"), True), (("zip", "02139"), False),
    (("ssn_last4", "6789"), True), (("ssn_last4", "6788"), False),
    (("mrn", "mrn700001"), True), (("mrn", "700001"), False)])
def test_the_second_factor_must_match(second: tuple[str, str], matches: bool) -> None:
    claim = Claim("nunezobrien", "zoe", "1980-02-14", second)
    assert patient_matches(RULES, PATIENT, claim) is matches


def test_the_first_name_when_given_and_the_birth_date_must_match() -> None:
    assert not patient_matches(RULES, PATIENT, Claim("nunezobrien", "zed", "1980-02-14",
                                                      ("zip", "02134")))
    assert not patient_matches(RULES, PATIENT, Claim("nunezobrien", None, "1980-02-15",
                                                      ("zip", "02134")))
    assert patient_matches(RULES, PATIENT, Claim("nunezobrien", None, "1980-02-14",
                                                  ("zip", "02134")))


def test_a_site_table_replaces_the_shipped_rules(tmp_path: Path) -> None:
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "matching.csv").write_text(
        "factor,rule,value,note\nname,casefold,,\nphone,country_code,44,UK\n"
        "date,format,%d/%m/%Y,UK order\nzip,digits,3,\n", encoding="utf-8")
    site = MatchingRules.load(site=tmp_path)
    assert site.name("Zoë") == "zoë"  # accents count at this site
    assert site.phone("020 7946 0958") is None  # 10 digits with a leading 0: not national
    assert site.phone("2079460958") == "+442079460958"
    assert site.date("14/02/1980") == "1980-02-14" and site.date("1980-02-14") is None
    assert site.zip("02134") == "021"


def test_an_unknown_rule_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "matching.csv").write_text(
        "factor,rule,value,note\nname,casefold,,\nname,soundex,,\n", encoding="utf-8")
    with pytest.raises(TableErrors) as raised:
        MatchingRules.load(site=tmp_path)
    assert "matching.csv:3: unknown rule 'soundex' for factor 'name'" in str(raised.value)


@pytest.mark.slow
async def test_mappings_check_reports_a_bad_matching_table(tmp_path: Path) -> None:
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "matching.csv").write_text(
        "factor,rule,value,note\nzip,round,,\n", encoding="utf-8")
    code, out, err = await isthmus("mappings", "check", str(tmp_path))
    assert code == 2
    assert "agent/matching.csv:2: unknown rule 'round' for factor 'zip'" in err
    code, out, _ = await isthmus("mappings", "check")
    assert code == 0 and "ok: the agent API's caller matching rules" in out
