"""No PHI outside the data path, end to end: a synthetic patient with unique canary values
goes in over MLLP and through /fhir (good requests and bad ones whose values are the
canaries), and no canary, in any spelling, shows up in a log record, a span, a metric, an
error answer or the inbox listing. Each test also proves the data went through, so it
cannot pass by carrying nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import GatewayProcess, MllpPeer, message, segments, with_control_id
from gateway.config import load_settings
from gateway.store.inbox_sqlite import read_entries
from gateway.telemetry import configure
from support.wait import eventually

ADT = message("canary_adt_a01.hl7")
FAMILY, GIVEN, MRN = "QZXCANARYFAM", "WQVCANARYGIV", "MRNCANARY77123"
EMAIL = "qzx.canary@example.invalid"
# Every spelling a value could take on its way out: as sent in HL7 (19110317, 0173344), as
# FHIR writes it (1911-03-17, +1 555 0173344), as a person types it (555-017-3344). Checked
# case-insensitively. No short digit runs: they occur by chance in trace ids and times.
CANARIES = (FAMILY, GIVEN, MRN, EMAIL, "qzx.canary", "1911-03-17", "19110317", "0173344",
            "555-017-3344", "5550173344", "555 0173344", "Qzxcanary Lane", "Vqwcanaryville",
            "MRNCANARY99999")
API_KEY = "canary-test-key-5d1e"


def leaks(text: str) -> list[str]:
    """The canaries found in `text`, in any letter case."""
    lowered = text.lower()
    return [c for c in CANARIES if c.lower() in lowered]


# Bad requests whose values are the canaries: (method, path, body) -> the status expected.
BAD_REQUESTS: list[tuple[str, str, Any, int]] = [
    ("GET", f"/fhir/Patient?birthdate=1911-03-17{FAMILY}", None, 400),
    ("GET", "/fhir/Patient?birthdate=19110317", None, 400),
    ("GET", "/fhir/Patient?birthdate=gt1911-03-17T25:61", None, 400),
    ("GET", f"/fhir/Patient?_count={MRN}", None, 400),
    ("GET", f"/fhir/Observation?subject=:{FAMILY}", None, 400),
    ("GET", f"/fhir/Patient/{MRN}", None, 404),
    ("GET", f"/fhir/Patient/{MRN}/_history/1", None, 404),
    ("POST", "/fhir/Patient", {"resourceType": "Patient", "name": [{"family": FAMILY}],
                               "birthDate": f"1911-03-17{GIVEN}"}, 400),
    ("POST", "/fhir/Patient", {"resourceType": "Patient", "active": FAMILY,
                               "telecom": [{"system": "phone", "value": "555-017-3344"}]},
     400),
    ("POST", "/fhir/Patient", {"resourceType": "Patient", "name": FAMILY}, 400),
    ("POST", "/fhir/Patient", f'{{"resourceType": "Patient", "name": [{{"family": "{FAMILY}"',
     400),
    ("PUT", "/fhir/Patient/some-id", {"resourceType": "Patient", "id": MRN,
                                       "name": [{"family": FAMILY}]}, 400),
    ("POST", "/fhir", {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Patient"},
         "resource": {"resourceType": "Patient", "birthDate": f"{FAMILY}-1911"}}]}, 400),
    ("POST", "/fhir", {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient?birthdate={GIVEN}"}},
        {"request": {"method": "GET", "url": f"Patient/{MRN}"}}]}, 200),
]


@dataclass
class Traffic:
    """What the exercise saw: the patient found through FHIR and every error answer."""

    patient: dict[str, Any] = field(default_factory=dict)
    acks: list[str] = field(default_factory=list)
    ack_texts: list[str] = field(default_factory=list)
    error_bodies: list[str] = field(default_factory=list)


def bad_hl7() -> list[bytes]:
    """Messages refused or failing translation on their content, the content being
    canaries: a bad PID-7, bytes that are not UTF-8, an unsupported version."""
    bad_date = with_control_id(ADT.replace(b"|19110317|", b"|19110317" + GIVEN.encode()
                                           + b"|"), "CANARY-BAD-1")
    undecodable = (b"MSH|^~\\&|SYNTHADT|SYNTHHOSP|ISTHMUS|GATEWAY|20260314093000||"
                   b"ADT^A01|CANARY-BAD-2|P|2.5.1||||||UNICODE UTF-8\r"
                   b"PID|1||" + MRN.encode() + b"||" + FAMILY.encode() + b"^\xff\r")
    no_version = (b"MSH|^~\\&|SYNTHADT|SYNTHHOSP|ISTHMUS|GATEWAY|20260314093000||"
                  b"ADT^A01|CANARY-BAD-3|P|9.9\rPID|1||" + MRN.encode() + b"||"
                  + FAMILY.encode() + b"^" + GIVEN.encode() + b"||19110317\r")
    return [bad_date, undecodable, no_version]


async def exercise(mllp_port: int, http_url: str) -> Traffic:
    """Send the canary patient over MLLP, then find, read, write and misuse it via FHIR."""
    traffic = Traffic()
    peer = await MllpPeer.open(mllp_port)
    try:
        for raw in (ADT, *bad_hl7()):
            ack = await peer.request(raw, timeout=10)
            traffic.acks.append(segments(ack)["MSA"][0][1])
            traffic.ack_texts.append(ack.decode("utf-8", "replace"))
    finally:
        await peer.close()
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/fhir+json"}
    async with aiohttp.ClientSession(http_url, headers=headers) as session:
        async def arrived() -> bool:
            async with session.get(f"/fhir/Patient?family={FAMILY}") as response:
                bundle = await response.json()
            if bundle.get("entry"):
                traffic.patient = bundle["entry"][0]["resource"]
            return bool(traffic.patient)

        # Applied after the ACK, so look until it is there.
        await eventually(arrived, timeout=15, interval=0.05, what="the canary patient")
        for query in (f"identifier={MRN}", f"given={GIVEN}", "birthdate=1911-03-17",
                      f"email={EMAIL}", "phone=%2B1%20555%200173344"):
            async with session.get(f"/fhir/Patient?{query}") as response:
                found = await response.json()
                assert [e["resource"]["id"] for e in found["entry"]] == \
                    [traffic.patient["id"]], query
        async with session.get(f"/fhir/Patient/{traffic.patient['id']}") as response:
            assert (await response.json())["name"][0]["family"] == FAMILY
        async with session.get(f"/fhir/Patient?identifier={MRN[:-5]}99999") as response:
            assert response.status == 200 and "entry" not in await response.json()
        twin = {"resourceType": "Patient", "name": [{"family": FAMILY, "given": [GIVEN]}],
                "birthDate": "1911-03-17", "telecom": [{"system": "email", "value": EMAIL}]}
        async with session.post("/fhir/Patient", json=twin) as response:
            assert response.status == 201
        for method, path, body, status in BAD_REQUESTS:
            data = body if isinstance(body, str) else json.dumps(body) if body else None
            async with session.request(method, path, data=data) as response:
                text = await response.text()
                assert response.status == status, (method, path, text)
                if status != 200:
                    traffic.error_bodies.append(text)
                else:  # a batch: its entries' outcomes are the error answers
                    traffic.error_bodies += [json.dumps(e["response"]) for e in
                                             json.loads(text)["entry"]]
    return traffic


def api_key_entry() -> dict[str, Any]:
    return {"name": "canary", "key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
            "scopes": ["system/*.cruds"]}


def inbox_listing(data_dir: Path) -> str:
    """`isthmus inbox list` as an operator runs it."""
    listed = subprocess.run([sys.executable, "-m", "gateway", "inbox", "--data-dir",
                             str(data_dir), "list"], capture_output=True, text=True,
                            timeout=60, check=True)
    return listed.stdout + listed.stderr


def check_answers(traffic: Traffic) -> None:
    assert traffic.patient["name"][0]["family"] == FAMILY  # the data went through
    assert traffic.patient["birthDate"] == "1911-03-17"
    assert traffic.acks[0] in ("AA", "CA") and all(a != "AA" for a in traffic.acks[2:])
    assert len(traffic.error_bodies) >= len(BAD_REQUESTS)
    for body in traffic.error_bodies:
        assert not leaks(body), body
    for ack in traffic.ack_texts:  # ERR segments name the field and rule, not the value
        assert not leaks(ack), ack


@pytest.mark.slow
async def test_no_canary_in_logs_spans_metrics_errors_or_the_inbox(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from gateway.app.server import build_app
    from gateway.app.state import MLLP_ADDRESS

    caplog.set_level(logging.DEBUG)
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    telemetry = configure("none", span_exporter=spans, metric_reader=metrics)
    data_dir = tmp_path / "var"
    settings = load_settings(None, environ={}, overrides={
        "server.host": "127.0.0.1", "mllp.port": 0, "store.data_dir": data_dir,
        "store.synchronous": "normal",
        "auth.api_keys": [api_key_entry()]})
    app = build_app(settings, telemetry)
    # As `isthmus serve` runs it (gateway.app.serve): no access log, whose request lines
    # would carry search values; everything else the app logs is captured raw, unfiltered.
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        http_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        traffic = await exercise(app[MLLP_ADDRESS][1], http_url)
        entries = await read_entries(data_dir / "inbox.db", 100)
    finally:
        await runner.cleanup()

    check_answers(traffic)
    records = [r for r in caplog.records if r.name.startswith(("gateway", "aiohttp"))]
    assert any(r.name.startswith("gateway") for r in records)  # the app did log
    for record in caplog.records:
        logged = record.getMessage() + (record.exc_text or "") + repr(record.args)
        assert not leaks(logged), (record.name, logged)
    assert not leaks(caplog.text)

    finished = spans.get_finished_spans()
    names = {s.name for s in finished}
    assert {"mllp.message", "fhir.request"} <= names
    for span in finished:
        assert not leaks(span.to_json()), span.name
    data = metrics.get_metrics_data()
    assert data is not None and not leaks(data.to_json())

    # The inbox holds the message (raw is the data path) and lists it without PHI.
    assert "CANARY-A01-0001" in {e.control_id for e in entries}
    assert not leaks(repr(entries))
    listing = inbox_listing(data_dir)
    assert "CANARY-A01-0001" in listing
    assert not leaks(listing), listing


@pytest.mark.slow
async def test_no_canary_leaves_a_served_gateway(tmp_path: Path) -> None:
    """The same traffic against `isthmus serve` at debug level, spans printed to stderr by
    the console exporter: nothing the process writes outside the data path holds PHI."""
    key = api_key_entry()
    process = GatewayProcess(tmp_path / "var", env={
        "ISTHMUS_LOG__LEVEL": "debug", "ISTHMUS_TELEMETRY__EXPORTER": "console",
        "ISTHMUS_STORE__SYNCHRONOUS": "normal",
        "ISTHMUS_AUTH__API_KEYS": f'[{{name = "{key["name"]}", key_sha256 = '
                                  f'"{key["key_sha256"]}", scopes = ["system/*.cruds"]}}]'})
    process.start()
    try:
        traffic = await exercise(process.mllp_port, f"http://127.0.0.1:{process.http_port}")
    finally:
        exit_code = process.terminate()
    stdout = process.remaining_stdout()
    stderr = (tmp_path / "gateway-stderr.log").read_text()
    check_answers(traffic)
    assert exit_code == 0
    assert '"name": "mllp.message"' in stderr and "DEBUG" in stderr  # spans and logs
    assert not leaks(stdout), stdout
    assert not leaks(stderr), [line for line in stderr.splitlines() if leaks(line)]
    listing = inbox_listing(tmp_path / "var")
    assert "CANARY-A01-0001" in listing and not leaks(listing)
