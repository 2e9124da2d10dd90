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
import re
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ConsoleMetricExporter,
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

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
    # A step of handling a message (parse, translate, store, ack): a fixed word.
    "stage",
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


# -- hot-path instruments ---------------------------------------------------------------

Labels = tuple[AttributeValue, ...]

# Milliseconds: a parse takes tens of microseconds, a slow backend seconds.
DURATION_BOUNDS_MS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0,
                      500.0, 1000.0, 2500.0, 5000.0, 10000.0)
SIZE_BOUNDS_BYTES = (256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
                     4194304.0, 16777216.0)
# Label sets per instrument before new ones fold into one "_other" series.
_MAX_SERIES = 1000
_OTHER = "_other"


def _check_labels(name: str, labels: Sequence[str]) -> None:
    for label in labels:
        if label not in SAFE_ATTRIBUTES:
            raise KeyError(f"metric {name}: attribute '{label}' is not in the PHI-safe "
                           "allow-list")


class FastCounter:
    """A monotonic count per label tuple, kept in a dict: adding is a dict update."""

    __slots__ = ("name", "labels", "unit", "description", "_values")

    def __init__(self, name: str, labels: tuple[str, ...], unit: str = "1",
                 description: str = "") -> None:
        self.name = name
        self.labels = labels
        self.unit = unit
        self.description = description
        self._values: dict[Labels, int] = {}

    def add(self, key: Labels, amount: int = 1) -> None:
        values = self._values
        current = values.get(key)
        if current is None:
            if len(values) >= _MAX_SERIES:
                key = (_OTHER,) * len(self.labels)
            current = values.get(key, 0)
        values[key] = current + amount

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        """The observable counter's callback (may run on an exporter's thread)."""
        labels = self.labels
        # list() copies the dict in one step under the GIL, so the event loop may go on
        # adding keys meanwhile.
        return [Observation(value, dict(zip(labels, key, strict=True)))
                for key, value in list(self._values.items())]


class _Series:
    __slots__ = ("counts", "total", "low", "high")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf


class FastHistogram:
    """Explicit-bucket counts, sum, min and max per label tuple (cumulative)."""

    __slots__ = ("name", "labels", "bounds", "unit", "description", "_series")

    def __init__(self, name: str, labels: tuple[str, ...], bounds: Sequence[float],
                 unit: str, description: str) -> None:
        self.name = name
        self.labels = labels
        self.bounds = tuple(bounds)
        self.unit = unit
        self.description = description
        self._series: dict[Labels, _Series] = {}

    def record(self, key: Labels, value: float) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._new(key)
        # bisect_left: a value equal to a bound falls in that bound's bucket (le).
        series.counts[bisect_left(self.bounds, value)] += 1
        series.total += value
        if value < series.low:
            series.low = value
        if value > series.high:
            series.high = value

    def _new(self, key: Labels) -> _Series:
        if len(self._series) >= _MAX_SERIES:
            key = (_OTHER,) * len(self.labels)
            if key in self._series:
                return self._series[key]
        series = self._series[key] = _Series(len(self.bounds) + 1)
        return series

    def points(self, start_ns: int, now_ns: int) -> list[HistogramDataPoint]:
        points = []
        for key, series in list(self._series.items()):
            counts = list(series.counts)
            count = sum(counts)
            if not count:
                continue
            points.append(HistogramDataPoint(
                attributes=dict(zip(self.labels, key, strict=True)),
                start_time_unix_nano=start_ns, time_unix_nano=now_ns, count=count,
                sum=series.total, bucket_counts=counts, explicit_bounds=self.bounds,
                min=series.low, max=series.high, exemplars=[]))
        return points


class Instruments:
    """The hot-path counters and histograms of one app; disabled until bound to a meter.

    Callers check `enabled` before doing any work of their own (timing, labels), so with
    no metric reader a measurement costs one attribute read.
    """

    def __init__(self, resource: Resource | None = None) -> None:
        self.enabled = False
        self._meter: metrics.Meter | None = None
        self._resource = resource or Resource.get_empty()
        self._start_ns = time.time_ns()
        self._counters: dict[str, FastCounter] = {}
        self._histograms: dict[str, FastHistogram] = {}

    def bind(self, meter: metrics.Meter) -> None:
        """Start exporting: counters become observable counters on `meter`."""
        self._meter = meter
        self.enabled = True
        for counter in self._counters.values():
            self._observe(counter)

    def _observe(self, counter: FastCounter) -> None:
        if self._meter is not None:
            self._meter.create_observable_counter(
                counter.name, callbacks=[counter.observe], unit=counter.unit,
                description=counter.description)

    def counter(self, name: str, labels: tuple[str, ...], *, unit: str = "1",
                description: str = "") -> FastCounter:
        existing = self._counters.get(name)
        if existing is not None:
            if existing.labels != labels:
                raise ValueError(f"metric {name} already exists with labels {existing.labels}")
            return existing
        _check_labels(name, labels)
        counter = self._counters[name] = FastCounter(name, labels, unit, description)
        self._observe(counter)
        return counter

    def histogram(self, name: str, labels: tuple[str, ...], bounds: Sequence[float], *,
                  unit: str = "ms", description: str = "") -> FastHistogram:
        existing = self._histograms.get(name)
        if existing is not None:
            if existing.labels != labels:
                raise ValueError(f"metric {name} already exists with labels {existing.labels}")
            return existing
        _check_labels(name, labels)
        histogram = self._histograms[name] = FastHistogram(name, labels, bounds, unit,
                                                           description)
        return histogram

    def histogram_metrics(self) -> list[Metric]:
        now = time.time_ns()
        out = []
        for histogram in list(self._histograms.values()):
            points = histogram.points(self._start_ns, now)
            if points:
                out.append(Metric(name=histogram.name, description=histogram.description,
                                  unit=histogram.unit, data=Histogram(
                                      data_points=points,
                                      aggregation_temporality=AggregationTemporality.CUMULATIVE)))
        return out

    def merge(self, data: MetricsData | None) -> MetricsData | None:
        """What the SDK collected, plus the histograms kept here."""
        extra = self.histogram_metrics() if self.enabled else []
        if not extra:
            return data
        scope = ScopeMetrics(scope=InstrumentationScope(TRACER_NAME), metrics=extra,
                             schema_url="")
        if data is None or not data.resource_metrics:
            return MetricsData(resource_metrics=[
                ResourceMetrics(resource=self._resource, scope_metrics=[scope], schema_url="")])
        first, *rest = data.resource_metrics
        return MetricsData(resource_metrics=[
            ResourceMetrics(resource=first.resource,
                            scope_metrics=[*first.scope_metrics, scope],
                            schema_url=first.schema_url),
            *rest])


STAGES = ("parse", "translate", "store", "ack", "total")
_ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
# MSH-9 as the gateway reports it: ADT^A01 or ADT^A01^ADT_A01; anything else is "other".
_MESSAGE_TYPE = re.compile(r"[A-Z0-9]{3}(\^[A-Z0-9]{2,3}(\^[A-Z0-9_]{3,7})?)?")
_MAX_MESSAGE_TYPES = 200


class IngestMetrics:
    """MLLP messages answered (by message type and ACK code), their sizes, and how long
    each stage of handling them took."""

    def __init__(self, instruments: Instruments) -> None:
        self.enabled = instruments.enabled
        self._messages = instruments.counter(
            "isthmus.mllp.messages", ("hl7.message_type", "hl7.ack_code"),
            unit="{message}", description="MLLP messages answered, by message type and ACK code")
        self._bytes = instruments.histogram(
            "isthmus.mllp.message_bytes", (), SIZE_BOUNDS_BYTES, unit="By",
            description="MLLP message sizes")
        self._stages = instruments.histogram(
            "isthmus.stage.duration", ("stage",), DURATION_BOUNDS_MS, unit="ms",
            description="time spent in each stage of handling an MLLP message")
        self._stage_keys: dict[str, Labels] = {name: (name,) for name in STAGES}
        self._types: dict[str, str] = {}

    def message(self, message_type: str, ack_code: str, size: int = 0) -> None:
        """One message answered: its MSH-9 ('' if unreadable), the ACK code, its bytes."""
        if not self.enabled:
            return
        label = self._types.get(message_type)
        if label is None:
            label = self._type_label(message_type)
        self._messages.add((label, ack_code if ack_code in _ACK_CODES else _OTHER))
        if size:
            self._bytes.record((), size)

    def clock(self) -> float:
        """A start time for `since` (0.0 when disabled: no clock read)."""
        return time.perf_counter() if self.enabled else 0.0

    def since(self, stage: str, started: float) -> None:
        """Record the time from `started` (from `clock`) to now against `stage`."""
        key = self._stage_keys[stage]  # an unknown stage raises, enabled or not
        if self.enabled:
            self._stages.record(key, (time.perf_counter() - started) * 1000.0)

    def stage(self, stage: str, ms: float) -> None:
        key = self._stage_keys[stage]
        if self.enabled:
            self._stages.record(key, ms)

    def _type_label(self, message_type: str) -> str:
        if not message_type:
            label = "unknown"
        elif _MESSAGE_TYPE.fullmatch(message_type) is None:
            label = _OTHER
        else:
            label = message_type
        if len(self._types) < _MAX_MESSAGE_TYPES:
            self._types[message_type] = label
            return label
        return self._types.get(message_type, _OTHER)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class FhirMetrics:
    """FHIR REST requests answered, by method and status, and how long they took."""

    def __init__(self, instruments: Instruments) -> None:
        self.enabled = instruments.enabled
        labels = ("http.request.method", "http.response.status_code")
        self._requests = instruments.counter(
            "isthmus.fhir.requests", labels, unit="{request}",
            description="FHIR REST requests answered, by method and status")
        self._duration = instruments.histogram(
            "isthmus.fhir.request.duration", labels, DURATION_BOUNDS_MS, unit="ms",
            description="time to answer a FHIR REST request")

    def clock(self) -> float:
        return time.perf_counter() if self.enabled else 0.0

    @staticmethod
    def method_label(method: str) -> str:
        """The method, or "_OTHER" for one outside HTTP's usual set (OpenTelemetry's HTTP
        conventions): a client cannot put arbitrary text into a label."""
        return method if method in _METHODS else "_OTHER"

    def request(self, method: str, status: int, started: float) -> None:
        if not self.enabled:
            return
        key = (self.method_label(method), status)
        self._requests.add(key)
        self._duration.record(key, (time.perf_counter() - started) * 1000.0)


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


# -- Prometheus text exposition format 0.0.4 ---------------------------------------------

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_NOT_LABEL = re.compile(r"[^a-zA-Z0-9_]")


def render_prometheus(data: MetricsData | None) -> bytes:
    """Counters as `<name>_total`, histograms as `_bucket{le=..}`/`_sum`/`_count`,
    up-down counters and gauges as gauges; dots in names become underscores."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                _render_metric(metric, families)
    out: list[str] = []
    for name, (kind, description, lines) in families.items():
        out.append(f"# HELP {name} {_escape_help(description)}\n# TYPE {name} {kind}\n")
        out.extend(lines)
    return "".join(out).encode()


def _render_metric(metric: Metric, families: dict[str, tuple[str, str, list[str]]]) -> None:
    data = metric.data
    name = _metric_name(metric.name)
    if isinstance(data, Sum):
        kind = "counter" if data.is_monotonic else "gauge"
        if data.is_monotonic and not name.endswith("_total"):
            name += "_total"
    elif isinstance(data, Gauge):
        kind = "gauge"
    elif isinstance(data, Histogram):
        kind = "histogram"
    else:  # exponential histograms: not configured here, and 0.0.4 has no such type
        return
    family = families.get(name)
    if family is None:
        family = families[name] = (kind, metric.description or "", [])
    elif family[0] != kind:
        return  # two instruments of different kinds under one name: keep the first
    lines = family[2]
    if isinstance(data, Histogram):
        for point in data.data_points:
            labels = _label_pairs(point.attributes)
            cumulative = 0
            for bound, count in zip(point.explicit_bounds, point.bucket_counts, strict=False):
                cumulative += count
                le = _braces(labels, f'le="{_number(bound)}"')
                lines.append(f"{name}_bucket{le} {cumulative}\n")
            le = _braces(labels, 'le="+Inf"')
            lines.append(f"{name}_bucket{le} {point.count}\n")
            lines.append(f"{name}_sum{_braces(labels)} {_number(point.sum)}\n")
            lines.append(f"{name}_count{_braces(labels)} {point.count}\n")
        return
    for number in data.data_points:
        lines.append(f"{name}{_braces(_label_pairs(number.attributes))} "
                     f"{_number(number.value)}\n")


def _metric_name(name: str) -> str:
    name = _NOT_NAME.sub("_", name)
    return "_" + name if name[:1].isdigit() else name


def _label_pairs(attributes: Mapping[str, Any] | None) -> list[str]:
    pairs = []
    for key, value in (attributes or {}).items():
        label = _NOT_LABEL.sub("_", key)
        if label[:1].isdigit():
            label = "_" + label
        if isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        text = text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        pairs.append(f'{label}="{text}"')
    return pairs


def _braces(pairs: list[str], extra: str | None = None) -> str:
    items = [*pairs, extra] if extra is not None else pairs
    return "{" + ",".join(items) + "}" if items else ""


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


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
