"""`isthmus translate --to hl7` never prints an incomplete message silently (issue 19,
item 3): a field the message's HL7 version requires, left empty, is named on stderr and
the exit is non-zero unless --allow-incomplete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

NAMED = {"resourceType": "Patient", "name": [{"family": "Quill", "given": ["Ada"]}],
         "gender": "female", "birthDate": "1985-02-14"}
IDENTIFIED = {**NAMED, "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5",
                                       "value": "MRN-4471"}]}


def _translate(tmp_path: Path, resource: dict[str, object],
               *flags: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "resource.json"
    path.write_bytes(orjson.dumps(resource))
    return subprocess.run([sys.executable, "-m", "gateway", "translate", "--to", "hl7",
                           str(path), *flags], capture_output=True, text=True, timeout=60)


def test_a_patient_without_an_identifier_is_refused_naming_pid_3(tmp_path: Path) -> None:
    result = _translate(tmp_path, NAMED)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "PID-3" in result.stderr and "--allow-incomplete" in result.stderr
    assert "Traceback" not in result.stderr


def test_allow_incomplete_prints_it_with_the_warning(tmp_path: Path) -> None:
    result = _translate(tmp_path, NAMED, "--allow-incomplete")
    assert result.returncode == 0, result.stderr
    segments = result.stdout.replace("\n", "\r").split("\r")
    pid = next(s for s in segments if s.startswith("PID|"))
    assert pid.split("|")[3] == "" and "Quill^Ada" in pid
    assert "warning: PID-3" in result.stderr


def test_a_complete_patient_translates_without_warnings(tmp_path: Path) -> None:
    result = _translate(tmp_path, IDENTIFIED)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "MRN-4471" in result.stdout
