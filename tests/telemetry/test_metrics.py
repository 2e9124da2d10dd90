"""GET /metrics: the Prometheus text format with MLLP and FHIR counts and stage timings, no
PHI in it, off when configured off; and a collector that is down never slows an ACK."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from conftest import MllpPeer, message, segments, start_gateway, with_control_id
from gateway.telemetry import (
    SAFE_ATTRIBUTES,
    SHUTDOWN_TIMEOUT,
    STAGES,
    IngestMetrics,
    Instruments,
    configure,
    render_prometheus,
)
from support.fhir import fhir_session, start_fhir_gateway

ADT = message("adt_a01.hl7")
CANARY = message("canary_adt_a01.hl7")
# PHI in canary_adt_a01.hl7: family and given name, identifier, street, city.
CANARIES = ("QZXCANARYFAM", "WQVCANARYGIV", "MRNCANARY77123", "Qzxcanary", "Vqwcanaryville")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


@dataclass
class Exposition:
    """The text format, parsed strictly: every line a comment or a well-formed sample."""

    types: dict[str, str] = field(default_factory=dict)
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Exposition:
        out = cls()
        assert text.endswith("\n")
        for line in text.splitlines():
            if line.startswith("# HELP "):
                continue
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ")
                assert kind in _TYPES and name not in out.types, line
                out.types[name] = kind
                continue
            match = _SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name, labels, value = match.groups()
            pairs = _LABEL.findall(labels) if labels else []
            assert ",".join(f'{k}="{v}"' for k, v in pairs) == (labels or ""), line
            key = (name, frozenset(pairs))
            assert key not in out.samples, f"duplicate series: {line}"
            out.samples[key] = float(value)
            assert _family(name, out.types) is not None, f"sample before its TYPE: {line}"
        return out

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def series(self, name: str) -> Iterator[tuple[dict[str, str], float]]:
        for (sample, labels), value in self.samples.items():
            if sample == name:
                yield dict(labels), value


def _family(sample: str, types: dict[str, str]) -> str | None:
    if sample in types:
        return sample
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample.removesuffix(suffix)
        if base != sample and types.get(base) == "histogram":
            return base
    return None


def check_histograms(exposition: Exposition) -> None:
    """Buckets never decrease with `le`, and +Inf equals _count."""
    for name, kind in exposition.types.items():
        if kind != "histogram":
            continue
        series: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
        for labels, value in exposition.series(name + "_bucket"):
            le = float(labels.pop("le"))
            series.setdefault(frozenset(labels.items()), []).append((le, value))
        for labels_key, buckets in series.items():
            counts = [count for _, count in sorted(buckets)]
            assert counts == sorted(counts), (name, labels_key)
            assert buckets[-1][0] == float("inf")
            assert exposition.samples[(name + "_count", labels_key)] == counts[-1]


async def scrape(session: aiohttp.ClientSession) -> tuple[str, Exposition]:
    async with session.get("/metrics") as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"] == CONTENT_TYPE
        text = await answer.text()
    exposition = Exposition.parse(text)
    check_histograms(exposition)
    return text, exposition


async def test_metrics_count_mllp_messages_by_type_and_ack_code_and_time_each_stage(
        tmp_path: Path) -> None:
    gw = await start_gateway(tmp_path / "var")
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        for n in range(3):
            ack = await peer.request(with_control_id(ADT, f"PROM-{n}"))
            assert segments(ack)["MSA"][0][1] == "AA"
        ack = await peer.request(b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01|PROM-BAD|P|9.9\r"
                                 b"PID|1||MRN-1||SYNTHETIC^Jane\r")
        assert segments(ack)["MSA"][0][1] == "AR"
        await peer.close()
        async with aiohttp.ClientSession(base_url=gw.http_url) as http:
            async with http.get("/fhir/metadata") as answer:
                assert answer.status == 200
            async with http.get("/fhir/Patient") as answer:
                assert answer.status == 401
            text, exposition = await scrape(http)
            async with http.head("/metrics") as answer:
                assert answer.status == 200
    finally:
        await gw.runner.cleanup()

    assert exposition.types["isthmus_mllp_messages_total"] == "counter"
    assert exposition.value("isthmus_mllp_messages_total",
                            hl7_message_type="ADT^A01", hl7_ack_code="AA") == 3
    assert exposition.value("isthmus_mllp_messages_total",
                            hl7_message_type="ADT^A01", hl7_ack_code="AR") == 1
    assert exposition.types["isthmus_stage_duration"] == "histogram"
    for stage in ("parse", "translate", "store", "ack"):
        count = exposition.value("isthmus_stage_duration_count", stage=stage)
        assert count >= 3, stage
        assert exposition.value("isthmus_stage_duration_bucket", stage=stage, le="+Inf") == count
        assert exposition.value("isthmus_stage_duration_sum", stage=stage) > 0
    assert exposition.value("isthmus_mllp_message_bytes_count") == 3
    # The FHIR side: by method and status, with a duration histogram.
    assert exposition.value("isthmus_fhir_requests_total", http_request_method="GET",
                            http_response_status_code="200") == 1
    assert exposition.value("isthmus_fhir_requests_total", http_request_method="GET",
                            http_response_status_code="401") == 1
    assert exposition.value("isthmus_fhir_request_duration_count", http_request_method="GET",
                            http_response_status_code="200") == 1
    # The listener's own: connections (an up-down counter is a gauge), in flight.
    assert exposition.types["isthmus_mllp_connections"] == "gauge"
    assert exposition.value("isthmus_mllp_connections") == 0
    assert exposition.value("isthmus_mllp_in_flight") == 0
    # Every label is an allow-listed attribute (dots as underscores), or a bucket's le.
    allowed = {name.replace(".", "_") for name in SAFE_ATTRIBUTES} | {"le"}
    for _, labels in exposition.samples:
        assert {name for name, _ in labels} <= allowed, labels
    assert "# HELP isthmus_mllp_messages_total " in text


async def test_no_phi_reaches_the_metrics(tmp_path: Path) -> None:
    gw = await start_fhir_gateway(tmp_path / "var")
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        ack = await peer.request(CANARY)  # enhanced mode (MSH-15 AL): a commit ACK
        assert segments(ack)["MSA"][0][1] == "CA"
        # The same patient, looked up by name and identifier: the query values are PHI.
        await peer.request(b"MSH|^~\\&|A|B|C|D|20261126||QZXCANARYFAM^A01|PROM-PHI|P|2.5\r"
                           b"PID|1||MRNCANARY77123||QZXCANARYFAM^WQVCANARYGIV\r")
        await peer.close()
        async with fhir_session(gw) as http:
            async with http.get("/fhir/Patient", params={
                    "family": "QZXCANARYFAM",
                    "identifier": "urn:oid:1.2.3.4.5|MRNCANARY77123"}) as answer:
                assert answer.status == 200
            async with http.get("/fhir/Patient/MRNCANARY77123") as answer:
                assert answer.status == 404
            text, exposition = await scrape(http)
    finally:
        await gw.runner.cleanup()
    assert exposition.value("isthmus_mllp_messages_total", hl7_message_type="ADT^A01",
                            hl7_ack_code="CA") == 1
    # A message type that is not an HL7 code is counted, but not by what it says.
    assert sum(value for labels, value in exposition.series("isthmus_mllp_messages_total")
               if labels["hl7_message_type"] == "_other") == 1
    assert exposition.value("isthmus_fhir_requests_total", http_request_method="GET",
                            http_response_status_code="200") == 1
    for canary in CANARIES:
        assert canary.lower() not in text.lower(), canary


async def test_audit_records_are_counted_by_the_commit_that_makes_them_durable(
        tmp_path: Path) -> None:
    """The audit trail's counts are plain numbers observed at collection (not an SDK
    counter added to after every group commit): each durable read record shows once."""
    gw = await start_fhir_gateway(tmp_path / "var")
    try:
        async with fhir_session(gw) as http:
            _, before = await scrape(http)
            for n in range(3):  # reads of ids that do not exist: each is on record first
                async with http.get(f"/fhir/Patient/prom-unknown-{n}") as answer:
                    assert answer.status == 404
            _, after = await scrape(http)
    finally:
        await gw.runner.cleanup()
    assert after.types["isthmus_audit_records_total"] == "counter"
    assert (after.value("isthmus_audit_records_total")
            - before.value("isthmus_audit_records_total")) == 3
    assert after.value("isthmus_audit_failures_total") == 0


async def test_metrics_answer_404_when_turned_off(tmp_path: Path) -> None:
    gw = await start_gateway(tmp_path / "var", **{"telemetry.prometheus": False})
    try:
        async with aiohttp.ClientSession(base_url=gw.http_url) as http:
            async with http.get("/metrics") as answer:
                assert answer.status == 404
            async with http.get("/healthz") as answer:
                assert answer.status == 200
    finally:
        await gw.runner.cleanup()


def test_the_text_format_escapes_label_values_and_renders_each_kind() -> None:
    telemetry = configure("none", prometheus=True)
    assert not telemetry.recording  # metrics only: spans stay no-op
    meter = telemetry.meter
    meter.create_counter("isthmus.test.events", description='a "test"\\ counter\nline 2'
                         ).add(2, {"outcome": 'say "hi"\\\nbye'})
    updown = meter.create_up_down_counter("isthmus.test.open")
    updown.add(5)
    updown.add(-2)
    meter.create_histogram("isthmus.test.size", unit="By").record(7, {"outcome": "ok"})
    meter.create_counter("isthmus.test.sent_total").add(1)
    text = telemetry.render_prometheus().decode()
    exposition = Exposition.parse(text)
    check_histograms(exposition)
    assert '# HELP isthmus_test_events_total a "test"\\\\ counter\\nline 2\n' in text
    assert 'isthmus_test_events_total{outcome="say \\"hi\\"\\\\\\nbye"} 2\n' in text
    assert exposition.types["isthmus_test_open"] == "gauge"
    assert exposition.value("isthmus_test_open") == 3
    assert exposition.value("isthmus_test_size_bucket", outcome="ok", le="+Inf") == 1
    assert exposition.value("isthmus_test_size_sum", outcome="ok") == 7
    assert exposition.types["isthmus_test_sent_total"] == "counter"  # no _total_total
    assert render_prometheus(None) == b""


def test_ingest_metrics_cost_nothing_without_a_reader_and_refuse_unknown_stages() -> None:
    off = configure("none")
    assert not off.instruments.enabled and not off.ingest.enabled
    assert off.ingest.clock() == 0.0
    off.ingest.message("ADT^A01", "AA", 100)
    off.ingest.since("parse", 0.0)
    with pytest.raises(KeyError):
        off.ingest.since("parsing", 0.0)
    assert off.instruments.histogram_metrics() == []
    with pytest.raises(KeyError, match="allow-list"):
        Instruments().counter("isthmus.test.leak", ("patient.name",))


def test_message_type_labels_are_codes_and_bounded() -> None:
    telemetry = configure("none", prometheus=True)
    ingest = IngestMetrics(telemetry.instruments)
    for value in ("ADT^A01", "ADT^A01^ADT_A01", "", "Smith^John", "adt^a01"):
        ingest.message(value, "AA")
    for n in range(500):
        ingest.message(f"Z{n:02d}^A01", "XX")
    for stage in STAGES:
        ingest.stage(stage, 1.5)
    exposition = Exposition.parse(telemetry.render_prometheus().decode())
    types = {labels["hl7_message_type"]
             for labels, _ in exposition.series("isthmus_mllp_messages_total")}
    assert {"ADT^A01", "ADT^A01^ADT_A01", "unknown", "_other"} <= types
    assert "Smith^John" not in types and "adt^a01" not in types
    assert len(types) <= 200 + 1
    codes = {labels["hl7_ack_code"]
             for labels, _ in exposition.series("isthmus_mllp_messages_total")}
    assert codes == {"AA", "_other"}
    assert exposition.value("isthmus_stage_duration_count", stage="total") == 1


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def send_all(port: int, count: int, prefix: str) -> float:
    """Send `count` ADT^A01 lock-step on one connection; every ACK must be AA. The slowest."""
    peer = await MllpPeer.open(port)
    slowest = 0.0
    try:
        for n in range(count):
            started = time.monotonic()
            ack = await peer.request(with_control_id(ADT, f"{prefix}-{n}"))
            slowest = max(slowest, time.monotonic() - started)
            assert segments(ack)["MSA"][0][1] == "AA"
    finally:
        await peer.close()
    return slowest


@pytest.mark.slow
async def test_a_collector_that_is_down_never_slows_an_ack(tmp_path: Path) -> None:
    from gateway.edge.http import TELEMETRY

    endpoint = f"http://127.0.0.1:{closed_port()}"
    gw = await start_gateway(tmp_path / "var", **{"telemetry.exporter": "otlp",
                                                  "telemetry.otlp_endpoint": endpoint})
    loop = asyncio.get_running_loop()
    flushes: list[asyncio.Future[bool]] = []
    try:
        telemetry = gw.app[TELEMETRY]
        assert telemetry.recording and telemetry.prometheus
        slowest = await send_all(gw.mllp_port, 10, "DOWN-A")
        # Export now, on threads, while more messages come in: each export is refused and
        # retried after a back-off, without holding up the event loop.
        assert telemetry.tracer_provider is not None and telemetry.meter_provider is not None
        flushes = [loop.run_in_executor(None, telemetry.tracer_provider.force_flush),
                   loop.run_in_executor(None, telemetry.meter_provider.force_flush)]
        started = time.monotonic()
        slowest = max(slowest, await send_all(gw.mllp_port, 40, "DOWN-B"))
        elapsed = time.monotonic() - started
        async with aiohttp.ClientSession(base_url=gw.http_url) as http:
            _, exposition = await scrape(http)
        assert exposition.value("isthmus_mllp_messages_total", hl7_message_type="ADT^A01",
                                hl7_ack_code="AA") == 50
        assert not all(flush.done() for flush in flushes)  # still retrying meanwhile
    finally:
        stopping = time.monotonic()
        await gw.runner.cleanup()
        stopped = time.monotonic() - stopping
        # Stopping ends the exporters' retries: the flushes give up soon after.
        await asyncio.wait_for(asyncio.gather(*flushes), timeout=5.0)
    # Not slowed, shown without a clock: all 40 ACKs came back while both exports were
    # still being refused and retried (asserted above), so no ACK waited for an export.
    # The ACK times are only reported: a busy CI machine once took 2.2 s for one.
    print(f"slowest ACK {slowest:.3f} s, 40 messages in {elapsed:.2f} s while exporting")
    # Stopping waits for the exporters a bounded time, not their 30 s default.
    assert stopped < SHUTDOWN_TIMEOUT + 3.0, stopped


@pytest.mark.slow
async def test_a_collector_that_never_answers_delays_shutdown_a_bounded_time(
        tmp_path: Path) -> None:
    # Listening but never accepting: requests connect, then wait for an answer that
    # never comes (the exporters' own timeout is what ends them).
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        endpoint = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        gw = await start_gateway(tmp_path / "var", **{"telemetry.exporter": "otlp",
                                                      "telemetry.otlp_endpoint": endpoint})
        try:
            slowest = await send_all(gw.mllp_port, 50, "HOLE")
        finally:
            stopping = time.monotonic()
            await gw.runner.cleanup()
            stopped = time.monotonic() - stopping
    assert slowest < 0.5, slowest
    assert stopped < SHUTDOWN_TIMEOUT + 3.0, stopped
