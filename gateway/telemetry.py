"""OpenTelemetry set-up and the one PHI-safe way every layer puts attributes on spans.

Spans and metrics leave the data path, so nothing but an allow-listed set of attribute
names may be set on them: message type, control id, sender, sizes and outcomes. Any other
name is a programming error and raises, so a test catches it before a deployment does.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

TRACER_NAME = "isthmus"

# The only attribute names allowed on spans and metric points. None of them carries PHI:
# control ids, application/facility names and message types identify messages, not people.
SAFE_ATTRIBUTES = frozenset({
    "hl7.message_type",
    "hl7.control_id",
    "hl7.version",
    "hl7.sending_application",
    "hl7.sending_facility",
    "hl7.ack_code",
    "hl7.error_code",
    "hl7.error_location",
    "hl7.duplicate",
    "hl7.enhanced_mode",
    "mllp.frame_bytes",
    "mllp.tls",
    "store.batch_size",
    "store.inbox_id",
    "mapping.status",
    "mapping.resources",
    "mapping.unmapped",
    "mapping.z_segments",
    "fhir.interaction",
    "fhir.resource_type",
    "fhir.client_id",
    "fhir.entries",
    "http.response.status_code",
    "store.applied",
    "outcome",
    # Forwarding: which backend, which attempt, the breaker's state, the verdict. Paths
    # are templates ("/Patient/{id}"), never ids or query values.
    "forward.backend",
    "forward.kind",
    "forward.attempt",
    "forward.breaker_state",
    "forward.verdict",
    "forward.retry_after",
    "forward.cache",
    "outbox.id",
    "http.request.method",
    "url.template",
    "server.address",
    "server.port",
})

_MAX_TEXT = 64

AttributeValue = str | int | float | bool


def safe_attributes(attributes: Mapping[str, AttributeValue]) -> dict[str, AttributeValue]:
    """Check names against the allow-list and bound text length; raise on an unknown name."""
    clean: dict[str, AttributeValue] = {}
    for name, value in attributes.items():
        if name not in SAFE_ATTRIBUTES:
            raise KeyError(f"span attribute '{name}' is not in the PHI-safe allow-list")
        clean[name] = value[:_MAX_TEXT] if isinstance(value, str) else value
    return clean


def set_attributes(span: trace.Span, attributes: Mapping[str, AttributeValue]) -> None:
    """Set PHI-safe attributes on a recording span; an unknown name raises.

    A span that is not recording (no exporter) is left alone at no cost; every test that
    exports spans exercises the same calls, so an unknown name cannot hide there.
    """
    if span.is_recording():
        span.set_attributes(safe_attributes(attributes))


@dataclass(frozen=True)
class Telemetry:
    """The tracer and meter the app hands down to every layer, and how to flush them."""

    tracer: trace.Tracer
    meter: metrics.Meter
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    @property
    def recording(self) -> bool:
        """Whether spans go anywhere; when not, callers may skip creating them."""
        return self.tracer_provider is not None

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def configure(
    exporter: Literal["none", "console", "otlp"],
    service_name: str = "isthmus",
    otlp_endpoint: str = "",
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
) -> Telemetry:
    """Build the tracer and meter for one app.

    With no exporter the API's no-op tracer and meter are used, so unexported spans cost
    close to nothing on the hot path. `span_exporter` and `metric_reader` let tests collect
    spans and metrics in memory.
    Providers are not installed globally, so several apps (tests) can live in one process.
    """
    if exporter == "none" and span_exporter is None and metric_reader is None:
        return Telemetry(trace.NoOpTracer(), metrics.NoOpMeter(TRACER_NAME))
    resource = Resource.create({"service.name": service_name})
    provider = TracerProvider(resource=resource)
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = otlp_endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    readers = _metric_readers(exporter, otlp_endpoint)
    if metric_reader is not None:
        readers.append(metric_reader)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return Telemetry(
        tracer=provider.get_tracer(TRACER_NAME),
        meter=meter_provider.get_meter(TRACER_NAME),
        tracer_provider=provider,
        meter_provider=meter_provider,
    )


def _metric_readers(exporter: str, otlp_endpoint: str) -> list[MetricReader]:
    if exporter == "console":
        return [PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr),
                                              export_interval_millis=60_000)]
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        endpoint = otlp_endpoint.rstrip("/") + "/v1/metrics"
        return [PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint))]
    return []
