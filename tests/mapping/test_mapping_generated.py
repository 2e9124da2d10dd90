"""The tables as generated Python source translate exactly as the compiler's closures (the
interpreter) do, over every message of the reference corpora and of tests/messages; the
generated module is kept by the tables' hash, found again, replaced when a table
changes, and never needed: without a usable cache the closures run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from conftest import REFERENCE
from gateway.fhir.bundle import dumps, to_bundle
from gateway.hl7.batch import split_messages
from gateway.hl7.errors import Hl7Error
from gateway.hl7.message import parse_message
from gateway.mapping.codegen.cache import PRUNE_AFTER_SECONDS
from gateway.mapping.codegen.emit import generate
from gateway.mapping.codegen.source import NotGenerated
from gateway.mapping.engine import Translator
from gateway.mapping.errors import MappingError
from gateway.mapping.tables import SHIPPED
from support.mapping import v2

ROOT = Path(__file__).resolve().parents[2]
FHIR_CONVERTER = REFERENCE.parent / "fhir-converter"
RECEIVED = datetime(2026, 11, 26, 8, 30, tzinfo=UTC)


def _messages() -> list[tuple[str, bytes]]:
    found = []
    for root, label in ((ROOT / "tests" / "messages", "tests/messages"),
                        (REFERENCE, "reference/messages"),
                        (FHIR_CONVERTER, "reference/fhir-converter")):
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.suffix not in (".hl7", ".txt") or not path.is_file():
                continue
            name = f"{label}/{path.relative_to(root).as_posix()}"
            for number, raw in enumerate(split_messages(path.read_bytes()), 1):
                found.append((f"{name}#{number}", raw))
    return found


MESSAGES = _messages()


@pytest.fixture(scope="module")
def generated() -> Translator:
    translator = Translator.load(generate=True)
    assert translator.generated
    return translator


@pytest.fixture(scope="module")
def interpreted() -> Translator:
    translator = Translator.load(generate=False)
    assert not translator.generated
    return translator


def _outcome(translator: Translator, raw: bytes) -> bytes:
    """Everything a translation gives: the Bundle's bytes, what was not mapped, how many
    Z segments; or the refusal, with its location and reason."""
    try:
        message = parse_message(raw)
    except Hl7Error as exc:
        return f"parse: {exc}".encode()
    try:
        translation = translator.translate(message, RECEIVED)
    except MappingError as exc:
        return f"refused: {type(exc).__name__}: {exc}".encode()
    return b"\n".join((dumps(to_bundle(translation)),
                       orjson.dumps(sorted(translation.unmapped.items())),
                       str(translation.z_segments).encode()))


def test_the_corpora_are_there() -> None:
    # tests/messages always; the shared corpora when the checkout has them beside it.
    assert len(MESSAGES) >= 60


@pytest.mark.parametrize(("name", "raw"), MESSAGES, ids=[n for n, _ in MESSAGES])
def test_generated_source_translates_as_the_interpreter(
        generated: Translator, interpreted: Translator, name: str, raw: bytes) -> None:
    assert _outcome(generated, raw) == _outcome(interpreted, raw)


def test_most_corpus_messages_translate(generated: Translator) -> None:
    # The comparison above is only worth something over messages that translate.
    translated = sum(not _outcome(generated, raw).startswith((b"parse:", b"refused:"))
                     for _, raw in MESSAGES)
    assert translated >= 0.9 * len(MESSAGES)


def _site_tables(tmp_path: Path) -> Path:
    tables = tmp_path / "tables"
    shutil.copytree(SHIPPED, tables)
    return tables


def _kept(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("tables-*.code"))


def test_generated_module_is_kept_by_the_tables_hash_and_found_again(tmp_path: Path) -> None:
    tables, cache = _site_tables(tmp_path), tmp_path / "cache"
    first = Translator.load(tables, cache=cache)
    assert first.generated
    kept = _kept(cache)
    assert len(kept) == 1
    assert (cache / kept[0].replace(".code", ".py")).read_text().startswith("# Generated")
    again = Translator.load(tables, cache=cache)
    assert again.generated and _kept(cache) == kept
    raw = (ROOT / "tests" / "messages" / "adt_a01.hl7").read_bytes()
    assert _outcome(again, raw) == _outcome(first, raw)


def test_a_changed_table_gets_a_new_module(tmp_path: Path) -> None:
    tables, cache = _site_tables(tmp_path), tmp_path / "cache"
    message = v2("MSH|^~\\&|A|F|B|G|20261126083000||ADT^A01|C1|P|2.5.1",
                 "EVN|A01", "PID|1||MRN-1^^^HOSP^MR||DOE^JANE||19800102|F", "PV1|1|I")
    before = Translator.load(tables, cache=cache)
    pid = tables / "segments" / "PID-Patient.csv"
    pid.write_text(pid.read_text().replace(
        "PID-8,,gender,code,,AdministrativeSex,,",
        "PID-8,,gender,code,,AdministrativeSex,,\nPID-8,,active,boolean,,,Y,"))
    after = Translator.load(tables, cache=cache)
    assert len(_kept(cache)) == 2
    assert b'"active":true' not in _outcome(before, message)
    assert b'"active":true' in _outcome(after, message)


def test_a_damaged_cache_file_is_made_again(tmp_path: Path) -> None:
    tables, cache = _site_tables(tmp_path), tmp_path / "cache"
    Translator.load(tables, cache=cache)
    (kept,) = cache.glob("tables-*.code")
    kept.write_bytes(b"not marshal data")
    translator = Translator.load(tables, cache=cache)
    assert translator.generated
    raw = (ROOT / "tests" / "messages" / "adt_a01.hl7").read_bytes()
    assert b'"resourceType":"Patient"' in _outcome(translator, raw)
    assert kept.read_bytes() != b"not marshal data"


def test_a_cache_that_cannot_be_written_runs_the_interpreter(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    translator = Translator.load(cache=blocked / "cache")
    assert not translator.generated
    raw = (ROOT / "tests" / "messages" / "adt_a01.hl7").read_bytes()
    assert b'"resourceType":"Patient"' in _outcome(translator, raw)


def test_table_errors_are_reported_before_anything_is_generated(tmp_path: Path) -> None:
    tables, cache = _site_tables(tmp_path), tmp_path / "cache"
    pid = tables / "segments" / "PID-Patient.csv"
    pid.write_text(pid.read_text() + "PID-8,,notAnElement,code,,,,\n")
    with pytest.raises(MappingError, match="PID-Patient.csv"):
        Translator.load(tables, cache=cache)
    assert _kept(cache) == []


def test_a_construct_without_a_description_is_not_generated() -> None:
    # A new engine construct the generator does not know yet: the caller keeps the
    # closures (Translator.load logs it and runs interpreted).
    with pytest.raises(NotGenerated):
        generate({"ADT^A01": lambda run: None}, {}, {}, "+00:00")


def test_translate_command_keeps_the_module_and_a_second_start_skips_the_compiler(
        tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    message = ROOT / "tests" / "messages" / "adt_a01.hl7"
    command = [sys.executable, "-X", "importtime", "-m", "gateway", "translate", str(message)]
    first = subprocess.run(command, env=env, capture_output=True, check=True)
    assert list((tmp_path / "xdg" / "isthmus" / "compiled-tables").glob("tables-*.code"))
    second = subprocess.run(command, env=env, capture_output=True, check=True)
    # The second start loads the kept module: no table read or checked, so neither the
    # compiler nor the HL7 definitions its checks need (hl7apy v2.8) are imported.
    assert b"gateway.mapping.compiler" in first.stderr
    assert b"gateway.mapping.compiler" not in second.stderr
    assert b"hl7apy.v2_8" not in second.stderr
    # Nor what translate never needs.
    for heavy in (b"aiohttp", b"opentelemetry", b"cryptography.x509", b"fhir.resources"):
        assert heavy not in second.stderr, heavy
    assert _without_time(first.stdout) == _without_time(second.stdout)


def _without_time(output: bytes) -> object:
    bundle = orjson.loads(output)
    for entry in bundle["entry"]:
        entry["resource"].pop("recorded", None)
    return bundle


def test_modules_of_other_table_sets_unused_for_a_month_are_pruned(tmp_path: Path) -> None:
    tables, cache = _site_tables(tmp_path), tmp_path / "cache"
    cache.mkdir()
    stale, recent = cache / "tables-0000.code", cache / "tables-1111.code"
    for path in (stale, recent):
        path.write_bytes(b"an older table set")
    month_ago = time.time() - PRUNE_AFTER_SECONDS - 60
    os.utime(stale, (month_ago, month_ago))
    Translator.load(tables, cache=cache)
    assert not stale.exists() and recent.exists()
    assert len(_kept(cache)) == 2  # the new module and the recent one


def test_a_cache_others_may_write_is_not_trusted(tmp_path: Path) -> None:
    # What is loaded from the cache runs as code: a directory another user may write to
    # is neither read nor written, and the closures run.
    tables, cache = _site_tables(tmp_path), tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    translator = Translator.load(tables, cache=cache)
    assert not translator.generated
    assert _kept(cache) == []


def test_a_site_offset_is_generated_as_the_interpreter_reads_it() -> None:
    # The site's offset is part of the generated module (constants, templates) and of
    # its hash: local times read in it alike, message by message.
    generated = Translator.load(default_offset="+05:30", generate=True)
    interpreted = Translator.load(default_offset="+05:30", generate=False)
    local = [raw for name, raw in MESSAGES if name.startswith("tests/messages/")]
    assert local
    for raw in local:
        assert _outcome(generated, raw) == _outcome(interpreted, raw)


def _with_rows(path: Path, rows: str, *, before: str = "") -> None:
    """`rows` added to a table file: at its end, or before the line starting `before`."""
    text = path.read_text()
    if before:
        at = text.index("\n" + before) + 1
        path.write_text(text[:at] + rows + text[at:])
    else:
        path.write_text(text + rows)


def test_instances_and_first_writes_the_generator_decides_translate_as_the_interpreter(
        tmp_path: Path) -> None:
    # What the generator decides when it writes a table function, on rows made to test
    # it: which instances it may hold in a variable, and where no earlier row can have
    # written a key (so no first-write-wins test): in a data-type function's `out`, in a
    # segment function's when no step runs it into an earlier resource (the PID's, not
    # the PD1's), across a field's repetitions. Each case below gives another answer
    # than the interpreter if it decides wrongly.
    tables, cache = _site_tables(tmp_path), tmp_path / "cache"
    # A data-type function: coding[1].code and text each written again by a later
    # component (the first row to write wins), into an instance made by an earlier group
    # and into the function's own `out`.
    _with_rows(tables / "datatypes" / "CWE-CodeableConcept.csv",
               "CWE.4,,coding[1].code,code,,,,\nCWE.5,,text,string,,,,\n")
    # A field's repetitions: each identifier made by a template row, then filled by the
    # CX's value (which must not replace the template's), then a constant for an existing
    # instance that the CX's system wins over.
    _with_rows(tables / "segments" / "PID-Patient.csv",
               "PID-3,,identifier.value,string,,,made-{PID-3.1},\n",
               before="PID-3,,identifier,Identifier")
    _with_rows(tables / "segments" / "PID-Patient.csv",
               "PID-3,,identifier.system,uri,,,urn:test:after-the-cx,\n")
    # An indexed instance (reaction[1]) that a constant row makes under a fixed key and a
    # field's first repetition makes under a key of its own: one instance, the same one.
    _with_rows(tables / "segments" / "AL1-AllergyIntolerance.csv",
               ",,reaction[1].description,string,,,made by a constant row,\n")
    generated = Translator.load(tables, cache=cache)
    interpreted = Translator.load(tables, generate=False)
    assert generated.generated and not interpreted.generated
    message = v2("MSH|^~\\&|A|F|B|G|20261126083000||ADT^A01|C1|P|2.5.1", "EVN|A01",
                 "PID|1||MRN-1^^^HOSP&1.2.3&ISO^MR~MRN-2^^^^MR||DOE^JANE||19800102|F",
                 "PV1|1|I", "AL1|1|DA|C1^Peanut^L^C4^Nut^L|SV|hives~wheeze")
    outcome = _outcome(interpreted, message)
    assert _outcome(generated, message) == outcome
    resources = {entry["resource"]["resourceType"]: entry["resource"]
                 for entry in orjson.loads(outcome.split(b"\n")[0])["entry"]}
    # The crafted rows matter: the interpreter's answer is the one each case expects.
    allergy = resources["AllergyIntolerance"]
    assert allergy["code"]["text"] == "Peanut"
    assert [c["code"] for c in allergy["code"]["coding"]] == ["C1", "C4"]
    assert [r.get("description") for r in allergy["reaction"]] == [
        "made by a constant row", None]
    assert [r["manifestation"][0]["text"] for r in allergy["reaction"]] == ["hives", "wheeze"]
    identifiers = resources["Patient"]["identifier"]
    assert [i["value"] for i in identifiers] == ["made-MRN-1", "made-MRN-2"]
    assert identifiers[0]["system"] != "urn:test:after-the-cx"
    assert identifiers[1]["system"] == "urn:test:after-the-cx"
    # And every message of tests/messages through these tables.
    for name, raw in MESSAGES:
        if name.startswith("tests/messages/"):
            assert _outcome(generated, raw) == _outcome(interpreted, raw), name


@pytest.mark.parametrize(("obr", "obx"), [
    # The OBR holds escapes (read from the OBX's functions: its OBR-3 into the
    # Observation's identity, OBR-4 and OBR-7), the OBX holds none...
    ("OBR|1|P\\T\\1|F\\T\\1|G\\S\\1^Glucose \\T\\ more^L|||20261126083000",
     "OBX|1|ST|2345-7^Glucose^LN||plain text||||||F"),
    # ...and the other way round; and both.
    ("OBR|1|P1|F1|G1^Glucose^L|||20261126083000",
     "OBX|1|ST|2345-7^Glucose \\T\\ co^LN||text \\F\\ more\\E\\||||||F"),
    ("OBR|1|P\\T\\1|F\\T\\1|G1^Glucose^L|||20261126083000",
     "OBX|1|ST|2345-7^Glucose \\T\\ co^LN||text \\F\\ more||||||F"),
])
def test_values_are_unescaped_by_their_own_segment_whichever_holds_escapes(
        generated: Translator, interpreted: Translator, obr: str, obx: str) -> None:
    # A segment without the escape character is walked without a search of each of its
    # values (`Segment.escape`); a value another segment holds is unescaped as its own.
    message = v2("MSH|^~\\&|LAB|F|B|G|20261126083000||ORU^R01|C1|P|2.5.1",
                 "PID|1||MRN-1^^^HOSP^MR||DOE^JANE", "ORC|RE|P1|F1", obr, obx,
                 "NTE|1||note \\T\\ one")
    outcome = _outcome(interpreted, message)
    assert not outcome.startswith((b"parse:", b"refused:"))
    assert _outcome(generated, message) == outcome
    assert b"\\T\\" not in outcome.split(b"\n")[0]  # each escape was undone
