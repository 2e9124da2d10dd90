"""`isthmus translate` and `isthmus mappings check` as operators run them, and a gateway
that refuses to start on a bad table.

Translation runs against the small table set of test_mapping_tables (through
ISTHMUS_MAPPING__TABLES_DIR), so tables being added to `mappings/` do not change it.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from test_mapping_tables import MAP_HEADER, MSH, message, pid, write_tables

from gateway.cli import main

# ADT_A01 requires PV1 (a message without it is refused: hl7/structure.py).
VISIT = "PV1|1|I"
ADT_1 = message(pid(f3="A1^^^&1.2.3&ISO", f5="Doe^Jane", f7="19850312", f8="F"), VISIT)
ADT_2 = message(pid(f3="A2^^^&1.2.3&ISO", f5="Roe^Jo", f7="1990", f8="M"), VISIT,
                msh=MSH.replace("|CTRL-1|", "|CTRL-2|"))
BAD_DATE = message(pid(f3="A1^^^&1.2.3&ISO", f7="19851345"), VISIT)
NO_PID = message(VISIT)


@pytest.fixture
def tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = write_tables(tmp_path / "tables")
    monkeypatch.setenv("ISTHMUS_MAPPING__TABLES_DIR", str(root))
    monkeypatch.delenv("ISTHMUS_MAPPING__SITE_DIR", raising=False)
    monkeypatch.delenv("ISTHMUS_CONFIG", raising=False)
    return root


def isthmus(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def translate_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, data: bytes,
                   *flags: str) -> tuple[int, str, str]:
    path = tmp_path / "input.hl7"
    path.write_bytes(data)
    return isthmus(capsys, "translate", str(path), *flags)


def control_id(bundle: dict[str, object]) -> str:
    entries = bundle["entry"]
    assert isinstance(entries, list)
    provenance = entries[-1]["resource"]
    return str(provenance["entity"][0]["what"]["identifier"]["value"])


# -- translate ------------------------------------------------------------------------------


def test_translate_prints_one_bundle_object_for_one_message(
        tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = translate_file(capsys, tmp_path, ADT_1)
    assert (code, err) == (0, "")
    assert out.endswith("\n") and out.count("\n") == 1  # compact: one line
    bundle = orjson.loads(out)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    patient = bundle["entry"][0]["resource"]
    assert patient["resourceType"] == "Patient"
    assert patient["birthDate"] == "1985-03-12" and patient["gender"] == "female"
    assert bundle["entry"][0]["request"]["url"] == "Patient?identifier=urn:oid:1.2.3|A1"


def test_translate_prints_an_array_for_several_messages(
        tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = translate_file(capsys, tmp_path, ADT_1 + ADT_2)
    assert (code, err) == (0, "")
    bundles = orjson.loads(out)
    assert isinstance(bundles, list)
    assert [control_id(b) for b in bundles] == ["CTRL-1", "CTRL-2"]
    assert bundles[1]["entry"][0]["resource"]["birthDate"] == "1990"


def test_translate_unwraps_a_batch_into_one_bundle_per_message(
        tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batch = (b"FHS|^~\\&|SENDAPP|SENDFAC\rBHS|^~\\&|SENDAPP|SENDFAC\r" + ADT_1 + ADT_2
             + b"BTS|2\rFTS|1\r")
    code, out, err = translate_file(capsys, tmp_path, batch)
    assert (code, err) == (0, "")
    bundles = orjson.loads(out)
    assert [control_id(b) for b in bundles] == ["CTRL-1", "CTRL-2"]


@pytest.mark.parametrize("args", [["translate", "-"], ["translate"]])
def test_translate_reads_stdin(tables: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(ADT_1)))
    code, out, err = isthmus(capsys, *args)
    assert (code, err) == (0, "")
    assert control_id(orjson.loads(out)) == "CTRL-1"


def test_translate_pretty_indents_the_same_document(
        tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, compact, _ = translate_file(capsys, tmp_path, ADT_1)
    code, pretty, err = translate_file(capsys, tmp_path, ADT_1, "--pretty")
    assert (code, err) == (0, "")
    assert pretty.startswith('{\n  "resourceType": "Bundle"')
    drop_recorded = [orjson.loads(text) for text in (compact, pretty)]
    for bundle in drop_recorded:
        del bundle["entry"][-1]["resource"]["recorded"]
    assert drop_recorded[0] == drop_recorded[1]


@pytest.mark.parametrize(("data", "line"), [
    pytest.param(BAD_DATE, "isthmus translate: PID-7: '19851345' is not a valid date",
                 id="invalid date"),
    pytest.param(message(pid(f3="A1"), msh=MSH.replace("ADT^A01^ADT_A01", "ORU^R01^ORU_R01")),
                 "isthmus translate: MSH-9: message type ORU^R01 is not supported",
                 id="unsupported type"),
    pytest.param(NO_PID, "isthmus translate: PID: required segment PID is missing (message "
                 "structure ADT_A01, HL7 v2.5.1)", id="required segment missing"),
    pytest.param(b"", "isthmus translate: the input holds no HL7 v2 message", id="empty"),
    pytest.param(b" \r\n\n", "isthmus translate: the input holds no HL7 v2 message",
                 id="blank"),
])
def test_translate_refuses_bad_input_with_one_line(
        tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes,
        line: str) -> None:
    code, out, err = translate_file(capsys, tmp_path, data)
    assert code == 2
    assert out == ""
    assert err.splitlines() == [line]


def test_a_refused_message_costs_only_itself(
        tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = translate_file(capsys, tmp_path, ADT_1 + BAD_DATE + ADT_2)
    assert code == 2
    assert [control_id(b) for b in orjson.loads(out)] == ["CTRL-1", "CTRL-2"]
    assert err.splitlines() == [
        "isthmus translate: message 2: PID-7: '19851345' is not a valid date"]


def test_translate_takes_several_files_and_names_the_one_refused(
        tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {"one.hl7": ADT_1, "bad.hl7": BAD_DATE, "two.hl7": ADT_2, "empty.hl7": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    code, out, err = isthmus(capsys, "translate", *(str(tmp_path / n) for n in files))
    assert code == 2
    assert [control_id(b) for b in orjson.loads(out)] == ["CTRL-1", "CTRL-2"]
    assert err.splitlines() == [
        f"isthmus translate: {tmp_path / 'bad.hl7'}: PID-7: '19851345' is not a valid date",
        f"isthmus translate: {tmp_path / 'empty.hl7'}: the input holds no HL7 v2 message"]


def test_translate_of_several_good_files_exits_0_with_every_bundle(
        tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "one.hl7").write_bytes(ADT_1)
    (tmp_path / "two.hl7").write_bytes(ADT_2)
    code, out, err = isthmus(capsys, "translate", str(tmp_path / "one.hl7"),
                             str(tmp_path / "two.hl7"))
    assert (code, err) == (0, "")
    assert [control_id(b) for b in orjson.loads(out)] == ["CTRL-1", "CTRL-2"]


def test_translate_refuses_text_that_is_not_hl7(
        tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = translate_file(capsys, tmp_path, b"Dear colleague,\nsee attached.\n")
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert err.startswith("isthmus translate: ") and "MSH" in err


def test_translate_names_a_missing_file(tables: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = isthmus(capsys, "translate", str(tmp_path / "nope.hl7"))
    assert (code, out) == (2, "")
    assert "nope.hl7" in err and len(err.splitlines()) == 1


# -- mappings check -----------------------------------------------------------------------


def test_mappings_check_accepts_the_shipped_tables(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = isthmus(capsys, "mappings", "check")
    assert code == 0, err
    assert out.startswith("ok: ") and "ADT^A01" in out
    assert "FHIR search parameters for" in out


def test_mappings_check_names_a_bad_search_parameter_row(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site"
    site.mkdir()
    table = site / "search-parameters.csv"
    table.write_text("resource,name,type,path,targets,compartment\n"
                     "Patient,family,string,name.family,,\n"
                     "Patient,shoe-size,token,shoeSize,,\n")
    code, out, err = isthmus(capsys, "mappings", "check", str(site))
    assert (code, out) == (2, "")
    assert f"{table}:3:" in err and "shoeSize" in err


def broken_site(root: Path) -> tuple[Path, list[str]]:
    """A site directory with several problems, and the lines `mappings check` must print."""
    (root / "segments").mkdir(parents=True)
    (root / "vocabulary").mkdir()
    zpi = root / "segments/ZPI-Patient.csv"
    zpi.write_text(MAP_HEADER + "ZPI-2,,colour,string,,,,\n"
                   "ZPI-3,,birthDate,string,,,,\n"
                   "ZPI-4,,name,HumanName,XPN-Nope,,,\n")
    sex = root / "vocabulary/AdministrativeSex.csv"
    sex.write_text("code,display,fhir_code,fhir_display,fhir_system,note\nF,,woman,,,\n")
    return root, [
        f"{zpi}:2: 'colour' is not an element of Patient",
        f"{zpi}:3: type mismatch: birthDate is date, the row says 'string'",
        f"{zpi}:4: unknown data-type map 'XPN-Nope'",
        "segments/PID-Patient.csv:7: type mismatch: vocabulary AdministrativeSex gives "
        "'woman'",
    ]


def test_mappings_check_lists_every_problem_of_a_broken_site(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tables = write_tables(tmp_path / "tables")
    site, expected = broken_site(tmp_path / "site")
    code, out, err = isthmus(capsys, "mappings", "check", "--tables", str(tables), str(site))
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert lines[-1] == f"{len(expected)} problem(s) found"
    assert len(lines) == len(expected) + 1
    for wanted in expected:
        assert any(wanted in line for line in lines[:-1]), (wanted, lines)


# -- serve ------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_with_a_bad_table_stops_before_listening(tmp_path: Path) -> None:
    site, expected = broken_site(tmp_path / "site")
    env = {**os.environ, "ISTHMUS_MAPPING__SITE_DIR": str(site)}
    env.pop("ISTHMUS_MAPPING__TABLES_DIR", None)
    env.pop("ISTHMUS_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--mllp-port", "0",
         "--http-port", "0", "--data-dir", str(tmp_path / "var")],
        capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 2
    assert "isthmus listening" not in result.stdout
    assert expected[0] in result.stderr  # file:line: reason, from the site's table
    assert "Traceback" not in result.stderr
