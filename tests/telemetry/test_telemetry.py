"""Spans for every MLLP message, with children for parse, store and ACK, and no PHI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import MllpPeer, message, start_gateway, with_control_id
from gateway.telemetry import configure, safe_attributes, set_attributes
from support.wait import eventually

ADT = message("adt_a01.hl7")
# Text that is PHI in the test message and cannot occur by chance in ids or timestamps.
PHI = ("CANARYFAMILY", "MRN-100001", "Example Street", "Springfield", "Quinn")


async def test_each_message_has_a_span_with_parse_store_and_ack_children(
        tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    gw = await start_gateway(tmp_path / "var", telemetry=configure("none",
                                                                   span_exporter=exporter))
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        await peer.request(with_control_id(ADT, "SPAN-1"))
        await peer.request(b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01|SPAN-BAD|P|9.9\r"
                           b"PID|1||MRN-100001||CANARYFAMILY^Jane\r")
        await peer.close()
    finally:
        await gw.runner.cleanup()
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "mllp.message"]
    assert len(roots) == 2
    good = next(s for s in roots if s.attributes and s.attributes.get("hl7.control_id") == "SPAN-1")
    assert good.attributes is not None
    assert good.attributes["hl7.message_type"] == "ADT^A01"
    assert good.attributes["hl7.ack_code"] == "AA"
    assert good.attributes["hl7.sending_application"] == "SYNTHLAB"
    children = {s.name for s in spans if s.parent is not None
                and s.parent.span_id == good.context.span_id}
    assert children == {"hl7.parse", "mapping.translate", "inbox.store", "audit.append",
                        "mllp.ack"}
    assert good.attributes["mapping.status"] == "translated"
    assert good.attributes["mapping.resources"] >= 2  # Patient, Encounter, ...
    assert isinstance(good.attributes["mapping.unmapped"], int)
    bad = next(s for s in roots if s is not good)
    assert bad.attributes is not None and bad.attributes["hl7.ack_code"] == "AR"
    assert bad.attributes["hl7.error_code"] == 203
    # No PHI anywhere in what the spans carry.
    dumped = json.dumps([json.loads(s.to_json()) for s in spans])
    for canary in PHI:
        assert canary not in dumped


def test_attribute_outside_the_allow_list_is_refused() -> None:
    with pytest.raises(KeyError, match="allow-list"):
        safe_attributes({"patient.name": "CANARYFAMILY"})
    tracer = configure("none", span_exporter=InMemorySpanExporter()).tracer
    span = tracer.start_span("x")
    with pytest.raises(KeyError):
        set_attributes(span, {"pid.5": "CANARYFAMILY"})


def test_long_values_are_bounded() -> None:
    assert safe_attributes({"hl7.control_id": "x" * 500})["hl7.control_id"] == "x" * 64


async def test_logs_of_a_refused_message_hold_no_phi(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    gw = await start_gateway(tmp_path / "var")
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        await peer.request(b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01|LOG-1|P|2.5||||||"
                           b"UNICODE UTF-8\rPID|1||MRN-100001||CANARYFAMILY^\xff\r")
        await peer.request(with_control_id(ADT, "LOG-2"))
        await peer.close()
    finally:
        await gw.runner.cleanup()
    assert "refused MLLP message" in caplog.text
    for canary in PHI:
        assert canary not in caplog.text


def test_console_exporter_prints_spans_to_stderr_never_stdout(
        capsys: pytest.CaptureFixture[str]) -> None:
    telemetry = configure("console")
    span = telemetry.tracer.start_span("mllp.message")
    set_attributes(span, {"hl7.control_id": "CONSOLE-1"})
    span.end()
    telemetry.shutdown()
    captured = capsys.readouterr()
    assert "CONSOLE-1" in captured.err
    assert captured.out == ""  # stdout carries only the listening line


async def test_metrics_count_answers_connections_and_skipped_bytes(tmp_path: Path) -> None:
    reader = InMemoryMetricReader()
    gw = await start_gateway(tmp_path / "var", telemetry=configure(
        "none", span_exporter=InMemorySpanExporter(), metric_reader=reader))
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        await peer.send_raw(b"junk!")
        await peer.request(with_control_id(ADT, "METRIC-1"))
        await peer.request(b"not hl7")
        await peer.close()
        await eventually(lambda: gw.mllp.connection_count == 0, what="the close, seen")
    finally:
        await gw.runner.cleanup()
    points: dict[tuple[str, tuple[tuple[str, object], ...]], float] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, tuple(sorted(point.attributes.items())))
                    points[key] = getattr(point, "value", getattr(point, "count", 0))
    assert points[("isthmus.mllp.messages",
                   (("hl7.ack_code", "AA"), ("hl7.message_type", "ADT^A01")))] == 1
    assert points[("isthmus.mllp.messages",
                   (("hl7.ack_code", "AR"), ("hl7.message_type", "unknown")))] == 1
    assert points[("isthmus.mllp.skipped_bytes", ())] == len(b"junk!")
    assert points[("isthmus.mllp.connections", ())] == 0
    # Metric labels carry codes, never message content.
    assert "CANARYFAMILY" not in repr(points)
