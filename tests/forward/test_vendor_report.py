"""`isthmus mappings check --against FILE.json`: which rows of the shipped vendor tables
the recorded sandbox payloads (vendor_payloads/, sources in its README) would hit, for
both shapes; a payload that cannot be read is one clear line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main

PAYLOADS = Path(__file__).parent / "vendor_payloads"


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["mappings", "check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def report_lines(out: str, table: str) -> dict[str, str]:
    """'epic.csv:6' -> its outcome, from the report's row lines."""
    rows: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith(f"  {table}.csv:"):
            where, _, rest = line.strip().partition(": ")
            rows[where] = rest.rpartition(": ")[2]
    return rows


def bundle_of(tmp_path: Path, *names: str) -> Path:
    resources: list[object] = []
    for name in names:
        loaded = json.loads((PAYLOADS / name).read_text(encoding="utf-8"))
        resources.extend(loaded if isinstance(loaded, list) else [loaded])
    path = tmp_path / "payload.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": r} for r in resources]}))
    return path


def test_the_epic_payloads_hit_the_epic_rows(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    payload = bundle_of(tmp_path, "epic/patient.json", "epic/observations.json",
                        "epic/not-found.json")
    code, out, err = check(capsys, "--vendor", "epic", "--against", str(payload))
    assert code == 0, err
    rows = report_lines(out, "epic")
    assert rows["epic.csv:6"] == rows["epic.csv:7"] == rows["epic.csv:8"] == "1 hit(s)"
    assert rows["epic.csv:9"] == "1 hit(s)"  # calculated pronouns dropped
    assert rows["epic.csv:14"] == "1 hit(s)"  # the 4102 error code kept
    assert rows["epic.csv:15"] == "1 hit(s)"  # the empty valueString repaired
    assert rows["epic.csv:12"] == "request row (not judged on a payload)"
    assert "epic: 6 of 6 answer rows hit by payload.json" in out


def test_the_cerner_payloads_hit_the_cerner_rows(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    payload = bundle_of(tmp_path, "cerner/patient.json", "cerner/observation.json",
                        "cerner/slots.json", "cerner/encounter.json")
    code, out, err = check(capsys, "--vendor", "cerner", "--against", str(payload))
    assert code == 0, err
    rows = report_lines(out, "cerner")
    assert rows["cerner.csv:7"] == rows["cerner.csv:8"] == "1 hit(s)"
    assert rows["cerner.csv:9"] == "1 hit(s)"  # the MRN identifier type
    assert rows["cerner.csv:10"] == "1 hit(s)"  # the ceuuid identifier
    assert rows["cerner.csv:13"] == "no hit"  # nothing empty to repair
    assert "cerner: 4 of 5 answer rows hit by payload.json" in out


def test_a_row_that_matches_nothing_says_so(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    payload = bundle_of(tmp_path, "cerner/patient.json")
    code, out, _ = check(capsys, "--vendor", "epic", "--against", str(payload))
    assert code == 0
    assert "epic: 0 of 6 answer rows hit" in out
    assert set(report_lines(out, "epic").values()) == {
        "no hit", "request row (not judged on a payload)"}


@pytest.mark.parametrize(("content", "reason"), [
    (b"{not json", "not JSON"),
    (b'{"name": "no type"}', "no resourceType"),
])
def test_a_payload_that_cannot_be_read_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
        reason: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    code, _, err = check(capsys, "--against", str(path))
    assert code == 2
    assert err.count("\n") == 1 and reason in err and str(path) in err


def test_an_unknown_vendor_is_named(tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = check(capsys, "--vendor", "nobody")
    assert code == 2 and "no vendor table 'nobody'" in err
