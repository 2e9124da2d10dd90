"""Hot-path metrics: counters and histograms kept as plain dicts, read when collected."""

from __future__ import annotations

import math
import re
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Self

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from gateway.telemetry.attributes import SAFE_ATTRIBUTES, TRACER_NAME, AttributeValue

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
        """What the SDK collected, plus the histograms kept here, in the SDK's own scope.

        One scope, not a second one of the same name: the OTLP encoder keys scopes by
        their identity, so a second "isthmus" scope replaced the SDK's (every counter and
        gauge was lost over OTLP while the console exporter, which lists both, showed
        them)."""
        extra = self.histogram_metrics() if self.enabled else []
        if not extra:
            return data
        if data is None or not data.resource_metrics:
            scope = ScopeMetrics(scope=InstrumentationScope(TRACER_NAME), metrics=extra,
                                 schema_url="")
            return MetricsData(resource_metrics=[
                ResourceMetrics(resource=self._resource, scope_metrics=[scope], schema_url="")])
        first, *rest = data.resource_metrics
        return MetricsData(resource_metrics=[
            ResourceMetrics(resource=first.resource,
                            scope_metrics=_with_metrics(first.scope_metrics, extra),
                            schema_url=first.schema_url),
            *rest])


def _with_metrics(scopes: Sequence[ScopeMetrics], extra: list[Metric]) -> list[ScopeMetrics]:
    """`scopes` with `extra` added to the gateway's scope (created if the SDK had none)."""
    merged: list[ScopeMetrics] = []
    added = False
    for scope in scopes:
        if not added and scope.scope.name == TRACER_NAME:
            scope = ScopeMetrics(scope=scope.scope, metrics=[*scope.metrics, *extra],
                                 schema_url=scope.schema_url)
            added = True
        merged.append(scope)
    if not added:
        merged.append(ScopeMetrics(scope=InstrumentationScope(TRACER_NAME), metrics=extra,
                                   schema_url=""))
    return merged


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
        self._conflicts = instruments.counter(
            "isthmus.mllp.control_id_conflicts", (), unit="{message}",
            description="messages kept as conflicts: another message's control id (MSH-10) "
                        "reused by the same sender within the duplicate window")

        self._identity_conflicts = instruments.counter(
            "isthmus.store.identity_conflicts", ("fhir.resource_type",), unit="{record}",
            description="business identifiers found on two records of the FHIR store when "
                        "a message was applied, each counted once (isthmus fhir merge "
                        "resolves them)")

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

    def conflict(self) -> None:
        """One message kept as a control id conflict (not a resend of one)."""
        if self.enabled:
            self._conflicts.add(())

    def identity_conflict(self, resource_type: str) -> None:
        """A business identifier newly found on two records of this type."""
        if self.enabled:
            self._identity_conflicts.add((resource_type,))

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


class PerMeter:
    """A set of instruments made once per meter: an instrument name is registered once
    per meter, so every user of a meter shares one set (`of`), and a set goes with its
    meter (held weakly). A subclass makes its instruments in `__init__(meter)`."""

    _by_meter: ClassVar[weakref.WeakKeyDictionary[metrics.Meter, Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._by_meter = weakref.WeakKeyDictionary()  # one registry per subclass

    def __init__(self, meter: metrics.Meter) -> None:
        pass

    @classmethod
    def of(cls, meter: metrics.Meter) -> Self:
        found: Self | None = cls._by_meter.get(meter)
        if found is None:
            found = cls._by_meter[meter] = cls(meter)
        return found

