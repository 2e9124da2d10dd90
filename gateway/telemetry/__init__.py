"""OpenTelemetry set-up and the one PHI-safe way every layer puts attributes on spans.

Spans and metrics leave the data path, so nothing but an allow-listed set of attribute
names may be set on them: message type, control id, sender, sizes and outcomes. Any other
name is a programming error and raises, so a test catches it before a deployment does.

Metrics recorded once per message or request (`IngestMetrics`, `FhirMetrics`) do not go
through the SDK's instruments, which cost about 5 us a measurement: they are plain dict
updates here (`Instruments`), read when a reader collects. Counters reach every metric
reader as observable counters; histograms are added to what the OTLP/console exporters
and the Prometheus endpoint receive.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
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
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.telemetry.attributes import (
    SAFE_ATTRIBUTES,
    TRACER_NAME,
    AttributeValue,
    mark_failed,
    safe_attributes,
    set_attributes,
)
from gateway.telemetry.instruments import (
    STAGES,
    FhirMetrics,
    IngestMetrics,
    Instruments,
)
from gateway.telemetry.prometheus import PROMETHEUS_CONTENT_TYPE, render_prometheus

log = logging.getLogger(__name__)

# -- W3C trace context -------------------------------------------------------------------


class _HeaderGetter(Getter[Any]):
    """Reads headers from aiohttp's multidict (or any mapping); two traceparent headers
    are no trace context at all (W3C Trace Context §3.2)."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        getall = getattr(carrier, "getall", None)
        values = list(getall(key, ())) if getall is not None else (
            [carrier[key]] if key in carrier else [])
        if not values or (key == "traceparent" and len(values) > 1):
            return None
        return values

    def keys(self, carrier: Any) -> list[str]:
        return list(carrier.keys())


_PROPAGATOR = TraceContextTextMapPropagator()
_GETTER = _HeaderGetter()


def parent_context(headers: Mapping[str, str]) -> Context | None:
    """The caller's trace as the parent of our span, from its `traceparent` (and
    `tracestate`) headers; None when it sent none. A malformed one gives an empty context:
    our span starts a new trace."""
    if "traceparent" not in headers:
        return None
    return _PROPAGATOR.extract(headers, context=Context(), getter=_GETTER)


def traceparent(span: trace.Span) -> str:
    """The span as a W3C traceparent, for the delivery spans to hang under; '' untraced."""
    context = span.get_span_context()
    if not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"



# -- the app's telemetry -----------------------------------------------------------------

# Seconds per OTLP request: the export threads give up on an unreachable collector (its
# spans are dropped), and stopping the gateway waits for the exporters at most this long.
EXPORT_TIMEOUT = 3.0
SHUTDOWN_TIMEOUT = 3.0


@dataclass(frozen=True)
class Telemetry:
    """The tracer and meter the app hands down to every layer, and how to flush them."""

    tracer: trace.Tracer
    meter: metrics.Meter
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    instruments: Instruments = field(default_factory=Instruments)
    prometheus_reader: InMemoryMetricReader | None = None
    span_processor: BatchSpanProcessor | None = None

    @property
    def recording(self) -> bool:
        """Whether spans go anywhere; when not, callers may skip creating them."""
        return self.tracer_provider is not None

    @property
    def prometheus(self) -> bool:
        """Whether GET /metrics answers."""
        return self.prometheus_reader is not None

    @cached_property
    def ingest(self) -> IngestMetrics:
        return IngestMetrics(self.instruments)

    @cached_property
    def fhir(self) -> FhirMetrics:
        return FhirMetrics(self.instruments)

    def parent_context(self, headers: Mapping[str, str]) -> Context | None:
        """The incoming W3C trace context (see `parent_context`)."""
        return parent_context(headers)

    def metrics_data(self, reader: InMemoryMetricReader | None = None) -> MetricsData | None:
        """Everything recorded so far: `reader`'s (default: the Prometheus reader's) SDK
        metrics plus the hot-path histograms."""
        reader = reader or self.prometheus_reader
        return self.instruments.merge(reader.get_metrics_data() if reader else None)

    def render_prometheus(self) -> bytes:
        return render_prometheus(self.metrics_data())

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Flush and stop the exporters, waiting about `timeout` seconds at most: a
        collector that is down costs a bounded wait and the data it would have had."""
        deadline = time.monotonic() + timeout
        spans = None
        if self.tracer_provider is not None:
            # The batch processor's own shutdown waits up to 30 s: run it aside, bounded.
            spans = threading.Thread(target=self.tracer_provider.shutdown,
                                     name="isthmus-span-shutdown", daemon=True)
            spans.start()
        if self.meter_provider is not None:
            try:
                self.meter_provider.shutdown(timeout_millis=timeout * 1000)
            except Exception as exc:  # the SDK raises a bare Exception for a late reader
                log.warning("metrics were not flushed at shutdown: %s", exc)
        if spans is None:
            return
        spans.join(max(deadline - time.monotonic(), 0.0))
        if spans.is_alive() and self.span_processor is not None:
            log.warning("spans not exported within %.1f s of shutdown (is the collector "
                        "down?); dropping the rest", timeout)
            # Ends the exporter's retries; the batches left then fail at once.
            self.span_processor.span_exporter.shutdown()
            spans.join(1.0)


def configure(
    exporter: Literal["none", "console", "otlp"],
    service_name: str = "isthmus",
    otlp_endpoint: str = "",
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
    prometheus: bool = False,
) -> Telemetry:
    """Build the tracer and meter for one app.

    With no exporter the API's no-op tracer and meter are used, so unexported spans cost
    close to nothing on the hot path. `prometheus` keeps metrics in memory for GET
    /metrics (spans stay no-op unless exported). `span_exporter` and `metric_reader` let
    tests collect spans and metrics in memory.
    Providers are not installed globally, so several apps (tests) can live in one process.
    """
    if (exporter == "none" and span_exporter is None and metric_reader is None
            and not prometheus):
        return Telemetry(trace.NoOpTracer(), metrics.NoOpMeter(TRACER_NAME))
    resource = Resource.create({"service.name": service_name})
    tracer_provider, processor = _tracing(exporter, otlp_endpoint, span_exporter, resource)
    instruments = Instruments(resource)
    readers = _metric_readers(exporter, otlp_endpoint, instruments)
    if metric_reader is not None:
        readers.append(metric_reader)
    prometheus_reader = InMemoryMetricReader() if prometheus else None
    if prometheus_reader is not None:
        readers.append(prometheus_reader)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    meter = meter_provider.get_meter(TRACER_NAME)
    if readers:
        instruments.bind(meter)
    return Telemetry(
        tracer=(tracer_provider.get_tracer(TRACER_NAME) if tracer_provider is not None
                else trace.NoOpTracer()),
        meter=meter,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        instruments=instruments,
        prometheus_reader=prometheus_reader,
        span_processor=processor,
    )


def _tracing(exporter: str, otlp_endpoint: str, span_exporter: SpanExporter | None,
             resource: Resource) -> tuple[TracerProvider | None, BatchSpanProcessor | None]:
    if span_exporter is None and exporter == "none":
        return None, None
    provider = TracerProvider(resource=resource)
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        return provider, None
    if exporter == "console":
        processor = BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = otlp_endpoint.rstrip("/") + "/v1/traces"
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint,
                                                        timeout=EXPORT_TIMEOUT))
    _quiet_dropped_spans()
    provider.add_span_processor(processor)
    return provider, processor


def _metric_readers(exporter: str, otlp_endpoint: str,
                    instruments: Instruments) -> list[MetricReader]:
    if exporter == "console":
        return [PeriodicExportingMetricReader(
            _WithInstruments(ConsoleMetricExporter(out=sys.stderr), instruments),
            export_interval_millis=60_000)]
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        endpoint = otlp_endpoint.rstrip("/") + "/v1/metrics"
        return [PeriodicExportingMetricReader(
            _WithInstruments(OTLPMetricExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT),
                             instruments),
            export_timeout_millis=EXPORT_TIMEOUT * 2000)]
    return []


class _WithInstruments(MetricExporter):
    """Hands an exporter the SDK's metrics plus the hot-path histograms kept outside it."""

    def __init__(self, inner: MetricExporter, instruments: Instruments) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self._inner = inner
        self._instruments = instruments

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        merged = self._instruments.merge(metrics_data) or metrics_data
        return self._inner.export(merged, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class _OncePerMinute(logging.Filter):
    """Lets one record per message text through each minute: the batch processor warns
    once per dropped span, from the event loop, exactly when the collector is down."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._last.get(str(record.msg), -math.inf) < 60.0:
            return False
        self._last[str(record.msg)] = now
        return True


def _quiet_dropped_spans() -> None:
    logger = logging.getLogger("opentelemetry.sdk._shared_internal")
    if not any(isinstance(f, _OncePerMinute) for f in logger.filters):
        logger.addFilter(_OncePerMinute())


__all__ = [
    "EXPORT_TIMEOUT", "PROMETHEUS_CONTENT_TYPE", "SAFE_ATTRIBUTES", "SHUTDOWN_TIMEOUT",
    "STAGES", "TRACER_NAME", "AttributeValue", "FhirMetrics", "IngestMetrics", "Instruments",
    "Telemetry", "configure", "mark_failed", "parent_context", "render_prometheus",
    "safe_attributes", "set_attributes", "traceparent",
]
