"""Settings of what the gateway tells operators: traces, metrics, logs."""

from __future__ import annotations

from typing import Literal

from gateway.config.base import Section as _Section


class TelemetryConfig(_Section):
    exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4318"
    service_name: str = "isthmus"
    # GET /metrics in the Prometheus text format (open, like /healthz; no PHI in it).
    prometheus: bool = True


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
