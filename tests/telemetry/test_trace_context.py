"""W3C Trace Context from FHIR clients: a `traceparent` makes our `fhir.request` span its
child; a malformed one is ignored; no query value reaches a span or the metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import RunningGateway
from gateway.telemetry import configure
from support.fhir import fhir_session, start_fhir_gateway

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
# Query values that name a patient: they must stay in the data path.
CANARY_NAME = "QZXTRACECANARY"
CANARY_ID = "MRNTRACE90210"


@dataclass
class Traced:
    gateway: RunningGateway
    spans: InMemorySpanExporter

    def requests(self) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == "fhir.request"]


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[Traced]:
    spans = InMemorySpanExporter()
    running = await start_fhir_gateway(
        tmp_path / "var", telemetry=configure("none", span_exporter=spans, prometheus=True))
    yield Traced(running, spans)
    await running.runner.cleanup()


async def get(traced: Traced, path: str, **headers: str) -> int:
    async with fhir_session(traced.gateway, **headers) as http, http.get(path) as answer:
        await answer.read()
        return answer.status


async def test_a_traceparent_makes_the_request_span_its_child(traced: Traced) -> None:
    assert await get(traced, "/fhir/metadata", traceparent=TRACEPARENT,
                     tracestate="vendor=opaque") == 200
    [span] = traced.requests()
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and span.parent.is_remote
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert span.context.trace_state.get("vendor") == "opaque"
    assert span.attributes is not None
    assert span.attributes["http.request.method"] == "GET"
    assert span.attributes["http.response.status_code"] == 200


async def test_the_trace_reaches_the_spans_under_the_request(traced: Traced) -> None:
    assert await get(traced, "/fhir/Patient/does-not-exist", traceparent=TRACEPARENT) == 404
    spans = traced.spans.get_finished_spans()
    assert spans and {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}


@pytest.mark.parametrize("traceparent", [
    "not a traceparent",
    f"00-{TRACE_ID}-{PARENT_ID}",                        # no flags
    f"00-{'0' * 32}-{PARENT_ID}-01",                     # all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01",                      # all-zero parent id
    f"ff-{TRACE_ID}-{PARENT_ID}-01",                     # version ff is invalid
    f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",             # upper-case hex
    f"00-{TRACE_ID}-{PARENT_ID}-01-extra",               # version 00 has no more fields
])
async def test_a_malformed_traceparent_starts_a_new_trace(traced: Traced,
                                                          traceparent: str) -> None:
    assert await get(traced, "/fhir/metadata", traceparent=traceparent) == 200
    [span] = traced.requests()
    assert span.parent is None
    assert format(span.context.trace_id, "032x") not in (TRACE_ID, "0" * 32)


async def test_two_traceparent_headers_are_no_trace_context(traced: Traced) -> None:
    async with fhir_session(traced.gateway) as http:
        headers = [("traceparent", TRACEPARENT),
                   ("traceparent", f"00-{'1' * 32}-{'2' * 16}-01")]
        async with http.get("/fhir/metadata", headers=headers) as answer:
            assert answer.status == 200
    [span] = traced.requests()
    assert span.parent is None


async def test_without_a_traceparent_the_request_is_a_root_span(traced: Traced) -> None:
    assert await get(traced, "/fhir/metadata") == 200
    [span] = traced.requests()
    assert span.parent is None and span.context.is_valid


async def test_no_query_value_reaches_a_span_or_the_metrics(traced: Traced) -> None:
    searches = [
        f"/fhir/Patient?family={CANARY_NAME}&identifier=urn:oid:1.2.3|{CANARY_ID}",
        f"/fhir/Patient?name:contains={CANARY_NAME}&_count=5",
        f"/fhir/Observation?patient=Patient/{CANARY_ID}",
        f"/fhir/Patient?unknownparam={CANARY_NAME}",
    ]
    statuses = [await get(traced, path, traceparent=TRACEPARENT) for path in searches]
    assert statuses[0] == 200
    finished = traced.spans.get_finished_spans()
    assert len(traced.requests()) == len(searches)
    for span in finished:
        attributes = dict(span.attributes or {})
        assert "url.query" not in attributes and "url.full" not in attributes
        dumped = json.dumps(attributes) + span.name + json.dumps(
            [dict(e.attributes or {}) for e in span.events])
        assert CANARY_NAME not in dumped and CANARY_ID not in dumped, span.name
    async with aiohttp.ClientSession(base_url=traced.gateway.http_url) as http:
        async with http.get("/metrics") as answer:
            assert answer.status == 200
            text = await answer.text()
    assert "isthmus_fhir_requests_total" in text
    assert CANARY_NAME not in text and CANARY_ID not in text
