"""The PHI-safe attribute allow-list: the only names spans and metric points may carry."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace

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
    # Why a slow connection was evicted: a fixed word (frame_deadline, min_rate, ...).
    "mllp.eviction_reason",
    # Which of the gateway's processes a figure is about: "edge" or "worker-<n>".
    "process",
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
    # The facade's vendor tables: a table's name and a row's line number (no values).
    "vendor.table",
    "vendor.row",
    "outbox.id",
    "http.request.method",
    "url.template",
    "server.address",
    "server.port",
    # Why work failed, as a type: an exception class name, an HTTP status, an ACK code
    # (OTel semantic conventions' error.type); never a message text.
    "error.type",
    # The agent API: which call (a fixed word: verify, book, ...) under which purpose.
    "agent.operation",
    "agent.purpose",
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


def mark_failed(span: trace.Span, error_type: str) -> None:
    """Status ERROR with the error's type only: OTel puts an exception's message in the
    description and an `exception` event, and a message can quote PHI, so neither is used."""
    if span.is_recording():
        kind = error_type[:_MAX_TEXT]
        span.set_attribute("error.type", kind)
        span.set_status(trace.Status(trace.StatusCode.ERROR, kind))

