"""The short cuts of the per-resource hot path give what the long way gives: ids are
uuid5 in the Isthmus namespace, a wildcard vocabulary answer kept for a code is the one
the wildcard makes (and the kept answers stay bounded), a Bundle search value is
percent-encoded exactly as `urllib.parse.quote` does, and a translation pickled the short
way (translator to apply worker) comes back as it was."""

from __future__ import annotations

import pickle
import uuid
from datetime import UTC, datetime
from urllib.parse import quote

import pytest

from conftest import message
from gateway.canonical import BusinessKey, Provenance, Resource, Translation
from gateway.canonical.ids import ID_NAMESPACE, name_uuid
from gateway.fhir.bundle import to_bundle
from gateway.fhir.escaping import escape_value
from gateway.hl7.message import parse_message
from gateway.mapping.convert import MSH7_OFFSET
from gateway.mapping.runtime import Run, _offset_of
from gateway.mapping.vocabulary import Vocab, recoder
from support.mapping import translator

NAMES = ["", "Patient|urn:oid:2.999.1|MRN-1", "Location|SYNTH|~{\"name\":\"4E\"}",
         "Practitioner|Ärztin Müller|€ 5", "x" * 500, "a|b\r\n\t|c"]


@pytest.mark.parametrize("name", NAMES)
def test_name_uuid_is_uuid5_in_the_isthmus_namespace(name: str) -> None:
    assert name_uuid(name) == str(uuid.uuid5(ID_NAMESPACE, name))


def test_every_variant_digit_matches_uuid5() -> None:
    # The 17th hex digit carries the RFC 4122 variant: all four of its values occur.
    seen = set()
    for n in range(400):
        expected = str(uuid.uuid5(ID_NAMESPACE, f"Observation|{n}"))
        assert name_uuid(f"Observation|{n}") == expected
        seen.add(expected[19])
    assert seen == {"8", "9", "a", "b"}


def _naming_systems() -> Vocab:
    return Vocab.from_parts(
        "NamingSystem", {"SSA": ("http://hl7.org/fhir/sid/us-ssn", "", "")},
        [("HL7", ("http://terminology.hl7.org/CodeSystem/v2-{*}", "", "")),
         ("", ("urn:isthmus:naming-system:{code}", "", ""))], {})


def test_a_wildcard_answer_kept_for_a_code_is_the_wildcards_answer() -> None:
    vocab = _naming_systems()
    for _ in range(3):
        assert vocab.lookup("SYNTHHOSP") == ("urn:isthmus:naming-system:SYNTHHOSP", "", "")
        assert vocab.lookup("HL70203") == (
            "http://terminology.hl7.org/CodeSystem/v2-0203", "", "")
        assert vocab.lookup("SSA") == ("http://hl7.org/fhir/sid/us-ssn", "", "")
    without_wildcards = Vocab.from_parts("Sex", {"F": ("female", "", "")}, [], {})
    assert without_wildcards.lookup("X") is None
    assert without_wildcards.lookup("X") is None


def test_the_kept_wildcard_answers_stay_bounded() -> None:
    vocab = _naming_systems()
    for n in range(10_000):
        assert vocab.lookup(f"NS{n}") == (f"urn:isthmus:naming-system:NS{n}", "", "")
    assert 0 < len(vocab.matched) <= 4096



@pytest.mark.parametrize(("codings", "recoded"), [
    # One coding (read without a comprehension): an exact code, then a wildcard's.
    ([{"code": "SSA"}], [{"system": "http://hl7.org/fhir/sid/us-ssn", "code": "SSA"},
                         {"code": "SSA"}]),
    ([{"code": "HL70203", "display": "Id type"}],
     [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "HL70203"},
      {"code": "HL70203", "display": "Id type"}]),
    # Two: each translated, the sender's own after its translation; none without a code.
    ([{"system": "http://hl7.org/fhir/sid/us-ssn", "code": "SSA"}, {"display": "x"}],
     [{"system": "http://hl7.org/fhir/sid/us-ssn", "code": "SSA"}, {"display": "x"}]),
])
def test_a_concepts_codings_are_translated_each_before_the_senders(
        codings: list[dict[str, str]], recoded: list[dict[str, str]]) -> None:
    vocab = Vocab.from_parts(
        "NamingSystem", {"SSA": ("SSA", "", "http://hl7.org/fhir/sid/us-ssn")},
        [("HL7", ("HL7{*}", "", "http://terminology.hl7.org/CodeSystem/v2-{*}"))], {})
    concept = recoder(vocab, "CodeableConcept")
    assert concept is not None
    for _ in range(2):  # the second time the wildcard's answer is a kept one
        assert concept({"coding": [dict(c) for c in codings]}, "X-1") == {"coding": recoded}
    exact_only = recoder(Vocab.from_parts("Sex", {"F": ("female", "", "")}, [], {}),
                         "CodeableConcept")
    assert exact_only is not None
    assert exact_only({"coding": [{"code": "X"}]}, "X-1") == {"coding": [{"code": "X"}]}
    assert exact_only({"coding": [{"code": "F"}]}, "X-1") == {
        "coding": [{"code": "female"}, {"code": "F"}]}

VALUES = ["MRN-100001", "urn:oid:2.16.840.1.113883.4.1", "a b", "x|y", "x&y+z#1", "1,2$3\\4",
          "Müller", "100%", "a/b:c@d!$'()*,;=.-_~", "tab\there", "é€\u2028", ""]


@pytest.mark.parametrize("value", VALUES)
def test_a_bundle_search_value_is_escaped_and_quoted_as_urllib_quotes_it(value: str) -> None:
    """The fast path (a value that needs no quoting is its own) agrees with escaping it as
    a search value ("," "|" "$" "\\" would split it) and quoting that as urllib does."""
    now = datetime(2026, 12, 6, tzinfo=UTC)
    source = Provenance(source_application="APP", source_facility="FAC", control_id="1",
                        message_type="ADT^A01", received_at=now, last_updated=now)
    resource = Resource(resource_type="Patient", id=name_uuid(value), primary=True,
                        key=BusinessKey(system=f"urn:sys:{value}", value=value),
                        content={}, provenance=source)
    bundle = to_bundle(Translation(provenance=source, resources=[resource]))
    safe = "/:@!$'()*,;=.-_~"
    assert bundle["entry"][0]["request"]["url"] == (
        f"Patient?identifier={quote(escape_value(f'urn:sys:{value}'), safe)}|"
        f"{quote(escape_value(value), safe)}")


def test_a_pickled_translation_comes_back_equal_of_the_same_types() -> None:
    made = translator().translate(parse_message(message("mapping_adt_a01.hl7")),
                                  datetime(2026, 12, 6, tzinfo=UTC))
    back = pickle.loads(pickle.dumps(made, protocol=pickle.HIGHEST_PROTOCOL))
    assert back == made
    assert to_bundle(back) == to_bundle(made)
    for before, after in zip(made.resources, back.resources, strict=True):
        assert type(after) is type(before) and type(after.key) is type(before.key)
        assert after.provenance == before.provenance
    # One Provenance shared by the resources stays one object (pickle's memo).
    assert len({id(r.provenance) for r in back.resources}) == len(
        {id(r.provenance) for r in made.resources})
    # A record built by its constructor, a default left out, keeps it; immutable stays so.
    now = datetime(2026, 12, 6, tzinfo=UTC)
    key = pickle.loads(pickle.dumps(BusinessKey(value="MRN-1")))
    assert key == BusinessKey("", "MRN-1") and type(key) is BusinessKey
    with pytest.raises(AttributeError):
        key.value = "MRN-2"  # type: ignore[misc]
    source = Provenance(source_application="APP", source_facility="FAC", control_id="1",
                        message_type="ADT^A01", received_at=now, last_updated=now)
    assert pickle.loads(pickle.dumps(source)) == source


def _adt_with_doctor(n: int) -> bytes:
    return ("MSH|^~\\&|SYNTHADT|SYNTHHOSP|ISTHMUS|GATEWAY|20261126083000||ADT^A01^ADT_A01|"
            f"HOT-{n}|P|2.5.1\rEVN|A01|20261126082900\r"
            f"PID|1||MRN-{n}^^^SYNTHHOSP^MR||SYNTHETIC^Pat||19800102|F\r"
            f"PV1|1|I|WARD{n % 7}^101^A^SYNTHHOSP||||D{n}^Doctor^Dana^^^Dr\r").encode()


def _ids(raw: bytes) -> list[tuple[str, str]]:
    translation = translator().translate(parse_message(raw))
    return [(r.resource_type, r.id) for r in translation.resources]


def test_ids_of_referred_to_resources_kept_across_messages_are_the_ids_made_anew() -> None:
    from gateway.mapping import engine, runtime

    # Fill the maps past their bound with doctors and wards seen once each.
    for n in range(4200):
        _ids(_adt_with_doctor(n))
    assert 0 < len(engine._REFERRED_IDS) <= 4096
    assert 0 < len(runtime._REFERRED_DIGESTS) <= 4096
    # A doctor and ward seen before give, from the maps, the ids a fresh start makes.
    warm = [_ids(_adt_with_doctor(n)) for n in (4199, 4198, 3)]
    engine._REFERRED_IDS.clear()
    runtime._REFERRED_DIGESTS.clear()
    cold = [_ids(_adt_with_doctor(n)) for n in (4199, 4198, 3)]
    assert warm == cold
    assert {"Practitioner", "Location"} <= {t for ids in cold for t, _ in ids}


MSH7 = ["20261126083000+0100", "20261126083000-0530", "202611260830+0100", "2026+0000",
        "202+0100", "202611260830001234+0100", "20261126083000.1234+0100",
        "20261126083000.12345+0100", "20261126083000.+0100", "20261126083000", "+0100",
        "20261126083000+010", "20261126083000+01000", "20261126083000 +0100",
        "20261126083000+0100\n", "20261126083000+0100\n\n", "20261126083000+0100\r",
        "2026112608.30.00+0100", "20261126083000+01a0", "٢٠٢٦١١٢٦+٠١٠٠", "", "\n"]


@pytest.mark.parametrize("msh7", MSH7)
def test_msh7_offset_is_what_the_regex_reads(msh7: str) -> None:
    match = MSH7_OFFSET.match(msh7)
    expected = f"{match.group(1)}{match.group(2)}:{match.group(3)}" if match else ""
    assert _offset_of(msh7) == expected


def _run_offset(msh7: str) -> str:
    raw = f"MSH|^~\\&|APP|FAC|GW|GW|{msh7}||ADT^A01|1|P|2.5.1\r".encode()
    return Run(parse_message(raw), "+09:00").offset


def test_msh7_offsets_kept_stay_bounded_and_are_each_stamps_own() -> None:
    from gateway.mapping import runtime

    # Past the bound: every stamp another, its offset another than the one before.
    for n in range(4200):
        sign = "-" if n % 2 else "+"
        assert _run_offset(f"2026112608{n:04d}{sign}0{n % 10}00") == f"{sign}0{n % 10}:00"
    assert 0 < len(runtime._OFFSETS) <= 4096
    # Stamps that differ only in their offset, or have none, each read as their own, kept
    # or not (twice over: the second time from the map).
    stamps = [msh7 for msh7 in MSH7 if "\r" not in msh7 and "\n" not in msh7]
    for msh7 in stamps + stamps:
        assert _run_offset(msh7) == (_offset_of(msh7) or "+09:00")
