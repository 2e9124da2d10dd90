"""`isthmus audit export`: FHIR AuditEvents (BALP) as NDJSON or a Bundle, CSV; filters;
decryption; every export on record; and offline verification of an export with the
public key alone, through the same tamper matrix as the live log."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from gateway.audit.export import CSV_COLUMNS
from gateway.audit.query import AuditQuery
from gateway.audit.record import Action, AuditRecord
from support.audit import (
    CANARY_MRN,
    T0,
    ingest_record,
    open_log,
    run_cli,
    write_records,
)

PERIOD = ("--from", "2026-11-20", "--to", "2026-11-20")  # the whole day of T0
BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."


@pytest.fixture
async def data_dir(tmp_path: Path) -> Path:
    """Twelve ingest records (patients MRN-0/1/2 and the canary), a read and a search."""
    data_dir = tmp_path / "var"
    log = await open_log(data_dir)
    await write_records(log, 1, 9)
    await log.checkpoint()
    await log.record(ingest_record(10, patient=f"SYNTHHOSP|{CANARY_MRN}"))
    await log.record(ingest_record(11, patient=f"OTHERHOSP|{CANARY_MRN}",
                                   client_id="OTHERLAB|OTHERHOSP",
                                   sending_application="OTHERLAB"))
    await log.record(ingest_record(12, outcome="AR:207", detail="store-unavailable"))
    await log.record(AuditRecord(Action.READ, time=T0.replace(hour=9), client_id="app-1",
                                 user="dr.who", peer="10.0.0.7", resource_type="Patient",
                                 resource_id="pat-77", patient="Patient/pat-77",
                                 purpose="TREAT", profile="scheduling"))
    await log.record(AuditRecord(Action.SEARCH, time=T0.replace(hour=10), client_id="app-1",
                                 peer="10.0.0.7", resource_type="Observation",
                                 patient=f"SYNTHHOSP|{CANARY_MRN}",
                                 query=f"patient={CANARY_MRN}&code=1234-5",
                                 query_shape="patient=*&code=*"))
    await log.close()
    return data_dir


def export(data_dir: Path, *args: str) -> tuple[int, str, str]:
    return run_cli("audit", "--data-dir", str(data_dir), "export", *args)


def public_key(data_dir: Path) -> Path:
    path = data_dir.parent / "gateway.pub.pem"
    path.write_text(run_cli("audit", "--data-dir", str(data_dir), "public-key")[1])
    return path


def verify_file(data_dir: Path, content: str | bytes, name: str = "export") -> tuple[int, str]:
    path = data_dir.parent / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    code, out, err = run_cli("audit", "verify", "--file", str(path), "--public-key",
                             str(public_key(data_dir)))
    return code, out + err


def events(ndjson: str) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in ndjson.splitlines()]
    return [line for line in lines if line["resourceType"] == "AuditEvent"]


def ids(ndjson: str) -> list[int]:
    return [int(e["id"]) for e in events(ndjson)]


# -- what is exported -----------------------------------------------------------------------


async def test_ndjson_export_is_balp_shaped_valid_fhir_and_verifies_offline(
        data_dir: Path) -> None:
    code, out, err = export(data_dir, *PERIOD, "--format", "ndjson")
    assert code == 0, err
    assert "14 records" in err
    exported = events(out)
    assert [e["id"] for e in exported] == [str(n) for n in range(1, 15)]
    for event in exported:
        AuditEvent.model_validate(event)
    ingest = exported[0]
    assert ingest["type"]["code"] == "110107" and ingest["action"] == "C"
    assert {c["code"] for c in ingest["subtype"]} >= {"ADT", "A01"}
    roles = {a["type"]["coding"][0]["code"]: a for a in ingest["agent"]}
    assert roles["110153"]["who"]["identifier"]["value"] == "SYNTHLAB|SYNTHHOSP"
    assert roles["110153"]["network"] == {"address": "127.0.0.1:40000", "type": "2"}
    patient = next(e for e in ingest["entity"] if e["role"]["code"] == "1")
    assert patient["type"]["code"] == "1"
    # Not decrypted: a pseudonym stands in for the patient, the same one per patient.
    assert patient["what"]["identifier"]["system"].endswith("patient-pseudonym")
    transaction = next(e for e in ingest["entity"] if e["type"]["code"] == "XrequestId")
    assert transaction["what"]["identifier"]["value"] == "CTRL-0001"
    failed = exported[11]
    assert failed["outcome"] == "8" and failed["outcomeDesc"] == "AR:207"
    read = exported[12]
    assert read["meta"]["profile"] == [BALP + "PatientRead"]
    assert read["agent"][0]["type"]["coding"][0]["code"] == "110152"  # BALP: reader is dest.
    assert read["agent"][0]["policy"] == ["urn:isthmus:task-profile:scheduling"]
    search = exported[13]
    assert search["meta"]["profile"] == [BALP + "PatientQuery"]
    query = next(e for e in search["entity"] if e["role"]["code"] == "24")
    assert base64.b64decode(query["query"]) == b"patient=*&code=*"
    assert CANARY_MRN not in out and "pat-77" not in out
    code, report = verify_file(data_dir, out)
    assert code == 0, report
    assert "audit trail intact: 14 exported records" in report


async def test_decrypted_export_shows_phi_and_still_verifies(data_dir: Path) -> None:
    code, out, err = export(data_dir, *PERIOD, "--format", "ndjson", "--decrypt")
    assert code == 0, err
    exported = {e["id"]: e for e in events(out)}
    patient = next(e for e in exported["10"]["entity"] if e["role"]["code"] == "1")
    assert patient["what"] == {"type": "Patient", "identifier": {
        "value": CANARY_MRN, "assigner": {"display": "SYNTHHOSP"}}}
    read = next(e for e in exported["13"]["entity"] if e["role"]["code"] == "4")
    assert read["what"] == {"reference": "Patient/pat-77"}
    query = next(e for e in exported["14"]["entity"] if e["role"]["code"] == "24")
    assert base64.b64decode(query["query"]).decode() == f"patient={CANARY_MRN}&code=1234-5"
    assert verify_file(data_dir, out)[0] == 0


async def test_bundle_export_is_a_valid_fhir_bundle(data_dir: Path) -> None:
    code, out, err = export(data_dir, *PERIOD, "--format", "bundle", "--decrypt")
    assert code == 0, err
    bundle = orjson.loads(out)
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection"
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["AuditEvent"] * 14 + ["Binary"]
    assert verify_file(data_dir, out)[0] == 0


async def test_csv_export_has_a_row_per_record_and_chain_rows(data_dir: Path) -> None:
    code, out, err = export(data_dir, *PERIOD, "--format", "csv", "--decrypt")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert tuple(rows[0]) == CSV_COLUMNS
    records = [r for r in rows if r["kind"] == "record"]
    assert len(records) == 14
    assert records[9]["patient"] == f"SYNTHHOSP|{CANARY_MRN}"
    assert records[0]["sending_application"] == "SYNTHLAB"
    assert {r["kind"] for r in rows} == {"record", "checkpoint", "manifest"}
    assert verify_file(data_dir, out)[0] == 0


async def test_csv_cells_cannot_become_spreadsheet_formulas(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    log = await open_log(data_dir)
    await log.record(ingest_record(1, sending_application="=HYPERLINK(\"x\")",
                                   client_id="=HYPERLINK(\"x\")|H"))
    await log.close()
    code, out, _ = export(data_dir, *PERIOD, "--format", "csv")
    record = next(r for r in csv.DictReader(io.StringIO(out)) if r["kind"] == "record")
    assert record["sending_application"] == "'=HYPERLINK(\"x\")"
    assert verify_file(data_dir, out)[0] == 0


@pytest.mark.parametrize(("filters", "expected"), [
    (("--patient", CANARY_MRN), [10, 11, 14]),  # the identifier under any authority
    (("--patient", f"SYNTHHOSP|{CANARY_MRN}"), [10, 14]),
    (("--patient", "Patient/pat-77"), [13]),
    (("--patient", "pat-77"), [13]),
    (("--client", "OTHERLAB|OTHERHOSP"), [11]),
    (("--client", "SYNTHLAB"), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]),  # any facility
    (("--action", "read"), [13]),
    (("--action", "search", "--patient", CANARY_MRN), [14]),
    (("--from", "2026-11-20T08:05:00Z", "--to", "2026-11-20T08:08:00Z"), [5, 6, 7]),
    (("--from", "2026-11-20T09:00:00+01:00", "--to", "2026-11-20T08:03:00"), [1, 2]),
])
async def test_filters_select_records_and_the_selection_verifies(
        data_dir: Path, filters: tuple[str, ...], expected: list[int]) -> None:
    args = dict(zip(PERIOD[::2], PERIOD[1::2], strict=True))
    args.update(dict(zip(filters[::2], filters[1::2], strict=True)))
    code, out, err = export(data_dir, *[x for kv in args.items() for x in kv],
                            "--format", "ndjson")
    assert code == 0, err
    assert ids(out) == expected
    # Records the filter left out are proved by their digests, never shown.
    assert verify_file(data_dir, out)[0] == 0


async def test_every_export_is_itself_on_record(data_dir: Path) -> None:
    export(data_dir, *PERIOD, "--patient", CANARY_MRN, "--format", "csv", "--decrypt")
    code, out, err = export(data_dir, "--from", "2000-01-01", "--to", "2100-01-01",
                            "--action", "export", "--format", "ndjson", "--decrypt")
    assert code == 0, err
    exports = events(out)
    assert len(exports) == 2  # the first export, and this one (recorded before it ran)
    first = exports[0]
    assert first["type"]["code"] == "110106" and first["purposeOfEvent"][0]["coding"][0][
        "code"] == "HCOMPL"
    patient = next(e for e in first["entity"] if e["role"]["code"] == "1")
    assert patient["what"]["identifier"]["value"] == CANARY_MRN
    query = next(e for e in first["entity"] if e["role"]["code"] == "24")
    assert CANARY_MRN in base64.b64decode(query["query"]).decode()
    assert query["description"].endswith("patient=*")  # the plain part never holds PHI


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (("--from", "2026-13-01", "--to", "2026-12-01", "--format", "csv"),
     "--from: not a date or time (use ISO 8601"),
    (("--from", "yesterday", "--to", "2026-12-01", "--format", "csv"),
     "--from: not a date or time"),
    (("--from", "2026-12-02", "--to", "2026-12-01", "--format", "csv"),
     "--to: must be later than --from"),
    (("--from", "2026-11-01", "--to", "2026-12-01", "--format", "csv", "--action", "peek"),
     "--action: unknown action (one of ingest, translate, read"),
    (("--from", "2026-11-01", "--to", "2026-12-01", "--format", "xml"),
     "argument --format: invalid choice: 'xml'"),
])
async def test_bad_export_arguments_get_a_clear_error(
        data_dir: Path, args: tuple[str, ...], message: str) -> None:
    code, out, err = export(data_dir, *args)
    assert code == 2
    assert message in err
    assert out == ""
    assert "Traceback" not in err


async def test_export_without_a_period_exports_everything(data_dir: Path) -> None:
    code, out, err = export(data_dir, "--format", "ndjson")
    assert code == 0, err
    # The 14 records, then this export's own record (made now, inside an open period).
    assert [e["id"] for e in events(out)] == [str(n) for n in range(1, 16)]
    # Either end alone leaves the other open: nothing before T0's day, everything after.
    code, out, err = export(data_dir, "--to", "2026-11-19", "--format", "ndjson")
    assert code == 0, err
    assert events(out) == []
    code, out, err = export(data_dir, "--from", "2026-11-20", "--format", "ndjson")
    assert code == 0, err
    assert len(events(out)) == 14 + 3  # and the three exports' own records
    assert "every record in the trail" in run_cli("audit", "export", "--help")[1]


async def test_a_bad_value_is_never_echoed(data_dir: Path) -> None:
    code, _, err = export(data_dir, "--from", CANARY_MRN, "--to", "2026-12-01",
                          "--format", "csv")
    assert code == 2 and CANARY_MRN not in err


def test_verify_file_needs_a_public_key(tmp_path: Path) -> None:
    (tmp_path / "x.ndjson").write_text("")
    code, _, err = run_cli("audit", "verify", "--file", str(tmp_path / "x.ndjson"))
    assert code == 2 and "--public-key" in err
    code, _, err = run_cli("audit", "verify", "--file", str(tmp_path / "missing"),
                           "--public-key", str(tmp_path / "x.ndjson"))
    assert code == 2 and "holds no public key" in err


# -- offline tamper matrix ---------------------------------------------------------------


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _edit_shown_field(text: str) -> str:
    lines = _lines(text)
    lines[4] = lines[4].replace('"recorded":"2026-11-20T08:05', '"recorded":"2026-11-20T08:06')
    return "".join(lines)


def _edit_body(text: str) -> str:
    lines = _lines(text)
    event = orjson.loads(lines[4])
    chain = event["extension"][0]["extension"]
    body = base64.b64decode(chain[2]["valueBase64Binary"]).replace(b"CTRL-0005", b"CTRL-0006")
    chain[2]["valueBase64Binary"] = base64.b64encode(body).decode()
    lines[4] = orjson.dumps(event).decode() + "\n"
    return "".join(lines)


def _delete_line(text: str) -> str:
    lines = _lines(text)
    del lines[4]
    return "".join(lines)


def _swap_lines(text: str) -> str:
    lines = _lines(text)
    lines[4], lines[5] = lines[5], lines[4]
    return "".join(lines)


def _insert_line(text: str) -> str:
    lines = _lines(text)
    event = orjson.loads(lines[4])
    event["id"] = "99"
    event["extension"][0]["extension"][0]["valueString"] = "99"
    lines.insert(-1, orjson.dumps(event).decode() + "\n")
    return "".join(lines)


def _truncate(text: str) -> str:
    return "".join(_lines(text)[:7])


def _rewrite_tail(text: str) -> str:
    # From record 5 on: bodies changed and chain hashes recomputed, as a forger would.
    import hashlib

    lines = _lines(text)
    prev = bytes.fromhex(orjson.loads(lines[3])["extension"][0]["extension"][1]["valueString"])
    for i in range(4, len(lines) - 1):
        event = orjson.loads(lines[i])
        chain = event["extension"][0]["extension"]
        seq = int(chain[0]["valueString"])
        body = base64.b64decode(chain[2]["valueBase64Binary"]).replace(b"SYNTHLAB", b"SYNTHLAX")
        prev = hashlib.sha256(prev + seq.to_bytes(8, "big")
                              + hashlib.sha256(body).digest()).digest()
        chain[1]["valueString"] = prev.hex()
        chain[2]["valueBase64Binary"] = base64.b64encode(body).decode()
        lines[i] = orjson.dumps(event).decode() + "\n"
    return "".join(lines)


OFFLINE_TAMPERING: list[tuple[str, Callable[[str], str], str]] = [
    ("a shown field edited", _edit_shown_field, "record 5: what the export shows differs"),
    ("one changed byte in a sealed body", _edit_body, "record 5:"),
    ("a record deleted", _delete_line, "record 5: it is listed in the signed manifest"),
    ("two records swapped", _swap_lines, "record 5: it appears out of order"),
    ("a record inserted", _insert_line, "record 99: it is not in the signed manifest"),
    ("the file truncated", _truncate, "record 8: the export ends after record 7"),
    ("the tail rewritten with recomputed hashes", _rewrite_tail,
     "record 5: its hash differs from the signed manifest"),
]


@pytest.mark.parametrize(("case", "tamper", "first"), OFFLINE_TAMPERING,
                         ids=[case for case, _, _ in OFFLINE_TAMPERING])
async def test_tampered_exports_are_detected_offline_naming_the_first_bad_record(
        data_dir: Path, case: str, tamper: Callable[[str], str], first: str) -> None:
    code, out, _ = export(data_dir, *PERIOD, "--format", "ndjson")
    assert verify_file(data_dir, out)[0] == 0
    code, report = verify_file(data_dir, tamper(out))
    assert code == 1, report
    assert report.splitlines()[0].removeprefix("audit trail NOT intact: ").startswith(first), \
        report


async def test_a_truncated_bundle_names_where_it_ends(data_dir: Path) -> None:
    code, out, _ = export(data_dir, *PERIOD, "--format", "bundle")
    code, report = verify_file(data_dir, "".join(_lines(out)[:6]))
    assert code == 1 and "record 6: the export ends after record 5" in report


async def test_an_export_verified_with_another_gateways_key_fails(
        data_dir: Path, tmp_path: Path) -> None:
    _, out, _ = export(data_dir, *PERIOD, "--format", "ndjson")
    other = tmp_path / "other" / "var"
    log = await open_log(other)
    await log.close()
    path = tmp_path / "export.ndjson"
    path.write_text(out)
    key = tmp_path / "other.pub.pem"
    key.write_text(run_cli("audit", "--data-dir", str(other), "public-key")[1])
    code, report, _ = run_cli("audit", "verify", "--file", str(path), "--public-key", str(key))
    assert code == 1 and "not trusted here" in report


def test_query_text_keeps_the_patient_out_unless_asked() -> None:
    query = AuditQuery(patient="SYNTHHOSP|MRN-1")
    assert query.text() == "patient=SYNTHHOSP%7CMRN-1"
    assert query.text(with_patient=False) == "patient=*"
