"""The forwarding instruments: attempts, their duration, retries, rate-limit waits, token
requests and breaker states, by backend (never by resource or patient)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from gateway.forward.resilience import BREAKER_STATES
from gateway.telemetry.instruments import PerMeter


class ForwardMetrics(PerMeter):
    """The forwarding instruments of one meter, shared by every backend that uses it (an
    instrument name is registered once per meter; observable callbacks read all of them)."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.requests = meter.create_counter(
            "isthmus.forward.requests", unit="{request}",
            description="Attempts sent to a backend, by status (or verdict when unanswered)")
        self.duration = meter.create_histogram(
            "isthmus.forward.duration", unit="ms", description="Time of one attempt")
        self.retries = meter.create_counter(
            "isthmus.forward.retries", unit="{retry}", description="Attempts that were retries")
        self.rate_limit_waits = meter.create_counter(
            "isthmus.forward.rate_limit_waits", unit="{wait}",
            description="Calls that waited for the backend's rate limit")
        self._states: dict[str, Callable[[], str]] = {}
        self._refreshes: dict[str, Callable[[], int]] = {}
        meter.create_observable_counter(
            "isthmus.forward.token_refreshes", callbacks=[self._observe_refreshes],
            unit="{request}", description="Token requests made for a backend")
        meter.create_observable_gauge(
            "isthmus.forward.breaker_state", callbacks=[self._observe_states],
            description="Circuit breaker: 0 closed, 1 half-open, 2 open")

    def watch(self, backend: str, breaker_state: Callable[[], str],
              refreshes: Callable[[], int] | None = None) -> None:
        """Report this backend's breaker state (and token requests) until `unwatch`."""
        self._states[backend] = breaker_state
        if refreshes is not None:
            self._refreshes[backend] = refreshes

    def unwatch(self, backend: str) -> None:
        self._states.pop(backend, None)
        self._refreshes.pop(backend, None)

    def _observe_states(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(BREAKER_STATES.get(state(), 0), {"forward.backend": name})
                for name, state in list(self._states.items())]

    def _observe_refreshes(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count(), {"forward.backend": name})
                for name, count in list(self._refreshes.items())]



class FacadeMetrics(PerMeter):
    """The facade's counters of one meter: the hits of every vendor table row (rows that
    never matched show as 0), links to hosts that are not the backend's, dropped, and
    answers that were not valid R4, by what was done with them. Labels: backend, table
    name, row line, a fixed word; never a URL or a value."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.links_dropped = meter.create_counter(
            "isthmus.facade.links_dropped", unit="{link}",
            description="Links in a backend's answer to a host that is not the backend's "
                        "(base_url or an alias), dropped")
        self.invalid_answers = meter.create_counter(
            "isthmus.facade.invalid_answers", unit="{answer}",
            description="Backend answers that were not valid R4, by outcome "
                        "(passed, repaired, rejected)")
        self._tables: dict[str, Callable[[], dict[int, int]]] = {}
        meter.create_observable_counter(
            "isthmus.vendor.rule_hits", callbacks=[self._observe_hits], unit="{hit}",
            description="Times each vendor table row matched, by table and row (line)")

    def watch_table(self, name: str, hits: Callable[[], dict[int, int]]) -> None:
        """Report a vendor table's row hits (every row, 0 for those never hit)."""
        self._tables[name] = hits

    def _observe_hits(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, {"vendor.table": name, "vendor.row": line})
                for name, hits in list(self._tables.items())
                for line, count in sorted(hits().items())]
