"""The Prometheus text exposition format (0.0.4) of collected OpenTelemetry metrics."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    Metric,
    MetricsData,
    Sum,
)

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


