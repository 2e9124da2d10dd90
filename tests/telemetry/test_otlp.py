"""OpenTelemetry over OTLP (issue 19, item 8): every metric `/metrics` shows also goes out
over OTLP, spans of failed work say ERROR with the error's type only, and invented message
types cannot grow the label set."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from conftest import MllpPeer, RunningGateway, message, segments, with_control_id
from support.fhir import fhir_session, start_fhir_gateway

ADT = message("adt_a01.hl7")
CANARY = message("canary_adt_a01.hl7")
CANARIES = ("QZXCANARYFAM", "WQVCANARYGIV", "MRNCANARY77123")
_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)


@dataclass
class Collector:
    """An OTLP/HTTP collector on 127.0.0.1 that keeps every request it is sent."""

    url: str = ""
    metrics: list[ExportMetricsServiceRequest] = field(default_factory=list)
    traces: list[ExportTraceServiceRequest] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def metric_names(self) -> set[str]:
        return {metric.name for request in self.metrics for resource in request.resource_metrics
                for scope in resource.scope_metrics for metric in scope.metrics}

    def spans(self) -> list[object]:
        return [span for request in self.traces for resource in request.resource_spans
                for scope in resource.scope_spans for span in scope.spans]


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    kept = Collector()

    async def metrics(request: web.Request) -> web.Response:
        body = await request.read()
        kept.bodies.append(body)
        kept.metrics.append(ExportMetricsServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        kept.bodies.append(body)
        kept.traces.append(ExportTraceServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/metrics", metrics)
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    kept.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield kept
    await runner.cleanup()


@pytest.fixture
async def exported(tmp_path: Path, collector: Collector) -> AsyncIterator[RunningGateway]:
    gateway = await start_fhir_gateway(tmp_path / "var", **{
        "telemetry.exporter": "otlp", "telemetry.otlp_endpoint": collector.url})
    yield gateway
    await gateway.runner.cleanup()


async def _traffic(gateway: RunningGateway) -> None:
    """Accepted and refused MLLP messages, FHIR reads that succeed and fail."""
    peer = await MllpPeer.open(gateway.mllp_port)
    try:
        assert segments(await peer.request(ADT))["MSA"][0][1] in ("AA", "CA")
        await peer.request(CANARY)
        refused = with_control_id(ADT, "REFUSED-1").replace(b"|2.5.1|", b"|9.9|")
        assert segments(await peer.request(refused))["MSA"][0][1] == "AR"
    finally:
        await peer.close()
    async with fhir_session(gateway) as http:
        async with http.get("/fhir/Patient") as answer:
            assert answer.status == 200
        async with http.get("/fhir/Patient/no-such-id") as answer:
            assert answer.status == 404


async def _flush(gateway: RunningGateway) -> None:
    from gateway.edge.http import TELEMETRY

    telemetry = gateway.app[TELEMETRY]
    assert telemetry.meter_provider is not None and telemetry.tracer_provider is not None
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, telemetry.meter_provider.force_flush)
    await loop.run_in_executor(None, telemetry.tracer_provider.force_flush)


def _otlp_name(family: str, kind: str) -> str:
    """The OTLP name of a Prometheus family: dots were made underscores, counters got
    `_total`. Compared with dots and underscores folded."""
    return (family.removesuffix("_total") if kind == "counter" else family).replace(".", "_")


async def test_every_metric_on_the_metrics_page_goes_out_over_otlp(
        exported: RunningGateway, collector: Collector) -> None:
    await _traffic(exported)
    await _flush(exported)
    async with aiohttp.ClientSession(base_url=exported.http_url) as http, \
            http.get("/metrics") as answer:
        page = await answer.text()
    families = {_otlp_name(name, kind) for name, kind in _TYPE_LINE.findall(page)}
    sent = {name.replace(".", "_") for name in collector.metric_names()}
    assert len(families) >= 8, page  # the page is not nearly empty
    assert families <= sent, sorted(families - sent)
    # Counters, up-down counters and gauges too, not only the histograms.
    assert {"isthmus_mllp_messages", "isthmus_mllp_connections", "isthmus_mllp_in_flight",
            "isthmus_audit_records", "isthmus_fhir_requests"} <= sent


async def test_failed_work_is_an_error_span_with_its_type_only(
        exported: RunningGateway, collector: Collector) -> None:
    await _traffic(exported)
    await _flush(exported)
    spans = collector.spans()
    by_name: dict[str, list[object]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)  # type: ignore[attr-defined]
    messages = by_name["mllp.message"]
    statuses = {_attribute(s, "hl7.ack_code"): s.status for s in messages}  # type: ignore[attr-defined]
    assert statuses["AR"].code == Status.STATUS_CODE_ERROR
    assert statuses["AR"].message == "AR"
    accepted = [status for code, status in statuses.items() if code in ("AA", "CA")]
    assert accepted and all(s.code != Status.STATUS_CODE_ERROR for s in accepted)
    refused = next(s for s in messages if _attribute(s, "hl7.ack_code") == "AR")
    assert _attribute(refused, "error.type") == "AR"
    # A 404 is the client's error: the server span is not failed (semantic conventions).
    requests = by_name["fhir.request"]
    assert all(s.status.code != Status.STATUS_CODE_ERROR for s in requests)  # type: ignore[attr-defined]
    # Nothing exported, metrics or spans, quotes the canary patient.
    exported_bytes = b"".join(collector.bodies)
    for canary in CANARIES:
        assert canary.encode() not in exported_bytes, canary


def _attribute(span: object, name: str) -> str | None:
    for attribute in span.attributes:  # type: ignore[attr-defined]
        if attribute.key == name:
            value = attribute.value
            return str(value.string_value or value.int_value)
    return None


async def test_invented_message_types_share_one_series(tmp_path: Path) -> None:
    gateway = await start_fhir_gateway(tmp_path / "var")
    try:
        peer = await MllpPeer.open(gateway.mllp_port)
        for number, invented in enumerate((b"QQQ^Q01", b"QQR^Q02", b"ZZZ^Z99", b"ADT^Q42")):
            sent = with_control_id(ADT, f"INVENTED-{number}").replace(b"ADT^A01", invented, 1)
            await peer.request(sent)
        await peer.close()
        async with aiohttp.ClientSession(base_url=gateway.http_url) as http, \
                http.get("/metrics") as answer:
            page = await answer.text()
    finally:
        await gateway.runner.cleanup()
    series = re.findall(r'^isthmus_mllp_messages_total\{hl7_message_type="([^"]*)"', page,
                        re.MULTILINE)
    assert "QQQ^Q01" not in series and "ZZZ^Z99" not in series and "ADT^Q42" not in series
    assert "_other" in series
