"""A translated message's store writes made straight from its canonical resources are the
writes its transaction Bundle gives once parsed back: entry for entry, in order, with the
same conditions (identifiers the Bundle quotes into URLs and the parser unquotes), ids,
fullUrls, create ids and carry; and what one refuses, the other refuses alike."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from conftest import MESSAGES, REFERENCE, message
from gateway.canonical import Translation
from gateway.fhir.bundle import to_bundle
from gateway.fhir.escaping import token
from gateway.fhir.search import TABLE, SearchRegistry
from gateway.fhir.transaction import condition
from gateway.hl7.message import parse_message
from gateway.ingest.applier import LocalApplier
from gateway.ingest.merges import keep_merge_state
from gateway.ingest.writes import bundle_writes, identifier_condition, translation_writes
from gateway.mapping.engine import Translator
from gateway.mapping.tables import SHIPPED
from gateway.store.fhir import FhirStore, SearchQuery, TokenMatch, WriteRequest
from gateway.store.inbox import ACCEPTED, APPLIED, InboundMessage, Inbox
from support.apply import open_apply_parts
from support.builders import with_fields

AT = datetime(2026, 12, 6, 9, 30, tzinfo=UTC)
BENCH = Path(__file__).resolve().parents[2] / "bench" / "translate.py"


def _bench_messages() -> ModuleType:
    """bench/translate.py, for its messages (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_translate", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _corpus() -> list[tuple[str, bytes]]:
    """Every HL7 file of tests/messages and of the shared reference corpus, the bench's
    messages and 50 of its new-patient ADT^A01."""
    cases = [(f"tests:{path.relative_to(MESSAGES)}", path.read_bytes())
             for path in sorted(MESSAGES.rglob("*.hl7"))]
    cases += [(f"reference:{path.relative_to(REFERENCE.parent)}", path.read_bytes())
              for path in sorted(REFERENCE.parent.rglob("*.hl7"))]
    bench = _bench_messages()
    cases += [(f"bench:{name}", text.encode()) for name, text in bench.MESSAGES.items()]
    cases += [(f"new-patient:{n}", text.encode())
              for n, text in enumerate(bench.new_patient_messages(50))]
    return cases


CORPUS = _corpus()

# PID-3 (the Patient's identifier: a conditional update) and PV1-7 (the attending doctor,
# with its assigning authority: a create-if-absent of the Practitioner and its
# Organization), with what a URL must quote: HL7 escapes \F\ (|) and \T\ (&).
QUOTING = [
    ("space", "MRN 300 001^^^SYNTH HOSP&urn:oid:1.2 3&ISO^MR",
     "1234 5^DOCTOR^Alex^^^Dr^^^AUTH A"),
    ("ampersand", "MRN\\T\\1^^^SYNTHHOSP&urn:oid:1.2&ISO^MR",
     "12\\T\\34^DOCTOR^Alex^^^Dr^^^A\\T\\B"),
    ("percent and plus", "MRN%25+1^^^SYNTHHOSP&urn:x:%41+&ISO^MR",
     "12%34+5^DOCTOR^Alex^^^Dr^^^AUTH%20A+"),
    ("non-ascii", "MRN-é漢字-1^^^SYNTHHOSP&urn:x:ü&ISO^MR",
     "1234-ß^DOCTOR^Alex^^^Dr^^^Straße"),
    ("url delimiters", "MRN#1?a=b;c/d@e^^^SYNTHHOSP&urn:x:#?=&ISO^MR",
     "12#3?4=5^DOCTOR^Alex^^^Dr^^^A#B?C=D"),
    ("search delimiters", "MRN,1$2\\E\\3^^^SYNTHHOSP&urn:x:a,b$c&ISO^MR",
     "12,34$5^DOCTOR^Alex^^^Dr^^^A,B$C"),
    ("bar in a value", "MRN\\F\\1^^^SYNTHHOSP&urn:oid:1.2&ISO^MR",
     "12\\F\\34^DOCTOR^Alex^^^Dr^^^AUTH"),
    ("bar in a system", "MRN-1^^^SYNTHHOSP&urn:x:a\\F\\b&ISO^MR",
     "1234^DOCTOR^Alex^^^Dr^^^A\\F\\B"),
]


@pytest.fixture(scope="module")
def translator() -> Translator:
    return Translator.load(SHIPPED)


@pytest.fixture(scope="module")
def registry() -> SearchRegistry:
    return SearchRegistry.load(SHIPPED / TABLE)


def outcome(make: Any) -> tuple[str, Any]:
    """What `make()` gives: its writes with the fields equality leaves out (carry, check),
    or the exception it raises (type and text)."""
    try:
        writes = make()
    except Exception as exc:
        return "raised", (type(exc).__name__, str(exc))
    return "writes", (writes, [(w.carry, w.check) for w in writes])


def assert_same_writes(registry: SearchRegistry, translation: Translation) -> None:
    direct = outcome(lambda: translation_writes(registry, translation))
    parsed = outcome(lambda: bundle_writes(registry, to_bundle(translation)))
    assert direct == parsed


def quoting_message(patient_identifier: str, doctor: str) -> bytes:
    raw = with_fields(message("mapping_adt_a01.hl7"), "PID", {3: patient_identifier})
    return with_fields(raw, "PV1", {7: doctor})


def test_the_corpus_is_there() -> None:
    # A corpus gone missing would leave the test below with nothing to compare.
    assert sum(name.startswith("reference:") for name, _ in CORPUS) >= 150
    assert sum(name.startswith("tests:") for name, _ in CORPUS) >= 50


@pytest.mark.parametrize(("name", "raw"), CORPUS, ids=[name for name, _ in CORPUS])
def test_writes_from_the_translation_are_the_bundles_writes(
        translator: Translator, registry: SearchRegistry, name: str, raw: bytes) -> None:
    try:
        translation = translator.translate(parse_message(raw), AT)
    except Exception as exc:  # the corpus holds messages made to be refused
        pytest.skip(f"does not translate ({type(exc).__name__})")
    assert_same_writes(registry, translation)


@pytest.mark.parametrize(("case", "patient_identifier", "doctor"), QUOTING,
                         ids=[case for case, _, _ in QUOTING])
def test_identifiers_a_url_must_quote_give_the_parsers_conditions(
        translator: Translator, registry: SearchRegistry, case: str,
        patient_identifier: str, doctor: str) -> None:
    translation = translator.translate(parse_message(
        quoting_message(patient_identifier, doctor)), AT)
    keys = [r.key for r in translation.resources if r.key is not None]
    assert any(k.value.startswith("MRN") for k in keys)  # PID-3 made the Patient's key
    assert_same_writes(registry, translation)


IDENTIFIER_VALUES = ["MRN-1", "MRN 1", "mrn-é漢字", "a|b", "a,b", "a$b", "a\\b", "\\", ",",
                     "x" * 300, " padded ", "%41+"]


@pytest.mark.parametrize("value", IDENTIFIER_VALUES)
@pytest.mark.parametrize(("resource_type", "system"), [
    ("Patient", "urn:oid:1.2.3"), ("Patient", "urn:x:a|b"), ("Organization", "urn:x:o"),
    ("Practitioner", "urn:x:a,b$c")])
def test_an_identifier_condition_made_directly_is_the_parsers(
        registry: SearchRegistry, resource_type: str, system: str, value: str) -> None:
    made = identifier_condition(registry, resource_type, system, value)
    parsed = condition(registry, resource_type, (("identifier", token(system, value)),))
    assert made == parsed
    assert made.clauses[0][0] == TokenMatch("identifier", system, value)


def test_every_write_keeps_merge_state_and_a_conditional_update_creates_at_its_id(
        translator: Translator, registry: SearchRegistry) -> None:
    translation = translator.translate(parse_message(message("mapping_adt_a01.hl7")), AT)
    writes = translation_writes(registry, translation)
    assert all(write.carry is keep_merge_state for write in writes)
    [patient] = [w for w in writes if w.resource_type == "Patient"]
    assert patient.method == "PUT" and patient.id is None and patient.condition is not None
    assert patient.create_id == patient.full_url.removeprefix("urn:uuid:")  # type: ignore[union-attr]
    assert writes[-1].resource_type == "Provenance"
    assert writes[-1].resource is not None
    assert [t["reference"] for t in writes[-1].resource["target"]] == [
        w.full_url for w in writes[:-1]]


@asynccontextmanager
async def applied_over(tmp_path: Path, held_id: str, system: str, value: str, raw: bytes
                       ) -> AsyncIterator[tuple[Inbox, FhirStore]]:
    """The inbox and FHIR store after the applier applied `raw` over a store holding one
    Patient (at `held_id`, identifier `system`|`value`); closed on leaving."""
    registry, translator, inbox, store = await open_apply_parts(tmp_path)
    applier = LocalApplier(store, registry, inbox, translator)
    try:
        await store.transact([WriteRequest("PUT", "Patient", held_id, {
            "resourceType": "Patient", "id": held_id,
            "identifier": [{"system": system, "value": value}]})], atomic=True)
        applier.start()
        await applier.drain()
        now = datetime.now(UTC)
        stored = await inbox.accept(InboundMessage(
            "SYNTHADT", "SYNTHHOSP", "APPLIED-OVER-1", "ADT^A01", "2.5.1", "test", raw,
            b"ACK", now, status=ACCEPTED))
        applier.submit(stored.inbox_id, translator.translate(parse_message(raw), now))
        await applier.drain()
        yield inbox, store
    finally:
        await applier.close()
        await store.close()
        await inbox.close()


async def test_a_message_whose_identifiers_need_quoting_updates_the_record_it_names(
        tmp_path: Path) -> None:
    """The Patient the store holds under the message's identifier (at an id of its own)
    is the one updated: the condition names the identifier as it is, unquoted."""
    system, value = "urn:x:a%20b%", "MRN 3&%+é 1"  # the mapping escapes a URI's space
    raw = quoting_message("MRN 3\\T\\%+é 1^^^SYNTHHOSP&urn:x:a b%&ISO^MR",
                          "12 %é^DOCTOR^Alex^^^Dr^^^AUTH A\\T\\B")
    async with applied_over(tmp_path, "held-before", system, value, raw) as (inbox, store):
        page = await store.search(SearchQuery("Patient", ((TokenMatch(
            "identifier", system, value),),)))
        [patient] = page.resources
        assert (patient.id, patient.version) == ("held-before", 2)
        assert orjson.loads(patient.body)["name"][0]["family"] == "CANARYFAMILY"
        assert {e.status for e in await inbox.list(10)} == {APPLIED}


@pytest.mark.parametrize(("mrn", "value"), [
    ("123,456", "123,456"), ("123\\F\\456", "123|456"), ("123$456", "123$456"),
    ("123\\E\\,456", "123\\,456")], ids=["comma", "bar", "dollar", "backslash"])
async def test_an_identifier_holding_a_search_delimiter_names_only_its_own_record(
        tmp_path: Path, mrn: str, value: str) -> None:
    """A "," in an MRN would make the conditional update an OR of two identifiers, one of
    them another patient's ("456" in any system); a "|" would split system from code, a
    "\\" start an escape. Escaped as search values, they name the one record."""
    raw = quoting_message(f"{mrn}^^^SYNTHHOSP&urn:oid:1.2&ISO^MR",
                          "1234^DOCTOR^Alex^^^Dr^^^AUTH")
    async with applied_over(tmp_path, "someone-else", "urn:oid:9.9", "456", raw) as (
            inbox, store):
        assert {e.status for e in await inbox.list(10)} == {APPLIED}
        page = await store.search(SearchQuery("Patient", ((TokenMatch(
            "identifier", "urn:oid:1.2", value),),)))
        [patient] = page.resources
        assert patient.id != "someone-else" and patient.version == 1
        other = await store.read("Patient", "someone-else")
        assert other is not None and other.version == 1
