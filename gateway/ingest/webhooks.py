"""A backend's change notifications (inbound webhooks): checked, recorded, then fetched.

`Webhooks.hook(name)` is what the edge asks of a backend's events: its signature is
checked against the shared secret (`verify`), the event read (`EventReader`), and a new
event id recorded durably (`WebhookEvents`) before the edge answers 202. The `Fetcher`
then claims recorded events in order, GETs each changed resource through the backend's
FHIR client (its credentials, breaker, rate limit and retries), applies the backend's
vendor table, checks it against R4 and writes it to the local FHIR store (a resend that
changes nothing adds no version). A backend that cannot answer leaves the event pending
with a later `next_at` (full-jitter backoff, never sooner than Retry-After): accepted
events are not lost to an outage, nor to a crash after the 202 (the next start claims
them). Logs and reasons name statuses and rules, never an id or a value.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry import metrics

from gateway.fhir import jsonio
from gateway.fhir.errors import InvalidResource
from gateway.fhir.validate import validate_resource
from gateway.forward.backend import FhirResponse
from gateway.forward.errors import BackendTimeout, BackendUnavailable
from gateway.forward.fhir_backend import FhirBackend
from gateway.forward.normalize import Normalizer
from gateway.forward.resilience import parse_retry_after, retry_delay
from gateway.ingest.webhook_events import ChangedResource, EventReader
from gateway.store.errors import StoreUnavailable, WriteConflict
from gateway.store.fhir import FhirStore, WriteRequest
from gateway.store.webhooks import WebhookEvent, WebhookEvents
from gateway.telemetry.instruments import PerMeter

log = logging.getLogger(__name__)

Scheme = Literal["hmac-sha256", "hmac-sha256-timestamp"]
# Claimed events are held this long; a process that dies holding them frees them then.
LEASE = 120.0
BATCH = 32
# The longest the fetcher sleeps without a wake-up (another instance's events, on PG).
IDLE = 5.0
_BACKOFF_BASE = 1.0
_RETRY_STATUSES = frozenset({401, 403, 408, 425, 429})
_GONE = frozenset({404, 410})


class WebhookMetrics(PerMeter):
    """One counter of events by backend and outcome (a fixed vocabulary, never a value):
    at the edge accepted, replayed, ignored, refused, malformed; after it done, unchanged,
    gone, deleted, failed, retried."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.events = meter.create_counter(
            "isthmus.webhook.events", unit="{event}",
            description="Backends' change notifications by backend and outcome")

    def count(self, backend: str, outcome: str) -> None:
        self.events.add(1, {"forward.backend": backend, "outcome": outcome})


class SignatureRefused(Exception):
    """An event whose signature does not verify; the reason names the check, not a value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Signing:
    """How one backend signs its events (config: `webhook.signature` and its headers)."""

    secret: bytes
    scheme: Scheme
    signature_header: str
    timestamp_header: str
    tolerance: float

    def verify(self, headers: Mapping[str, str], body: bytes,
               now: Callable[[], float] = time.time) -> None:
        """Raise SignatureRefused unless the signature header holds the HMAC-SHA256 of the
        signed bytes (hex or base64, optionally `sha256=`; several, comma-separated, while
        a secret is rotated) and, timestamped, the time is within the tolerance."""
        given = headers.get(self.signature_header, "")
        if not given:
            raise SignatureRefused(f"no {self.signature_header} header")
        signed = body
        if self.scheme == "hmac-sha256-timestamp":
            stamp = headers.get(self.timestamp_header, "").strip()
            try:
                moment = float(stamp)
            except ValueError:
                raise SignatureRefused(f"no readable {self.timestamp_header} header") from None
            if not abs(now() - moment) <= self.tolerance:
                raise SignatureRefused(f"{self.timestamp_header} outside the tolerance")
            signed = stamp.encode("ascii") + b"." + body
        expected = hmac.new(self.secret, signed, hashlib.sha256).digest()
        for candidate in given.split(","):
            digest = _digest(candidate.strip().removeprefix("sha256="))
            if digest is not None and hmac.compare_digest(digest, expected):
                return
        raise SignatureRefused("the signature does not match")


def _digest(text: str) -> bytes | None:
    """A SHA-256 digest written in hex (64) or base64 (44); None for anything else."""
    try:
        if len(text) == 64:
            return bytes.fromhex(text)
        if len(text) == 44:
            return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        return None
    return None


@dataclass(frozen=True, slots=True)
class Source:
    """A backend that sends webhooks: where the changed resources are fetched."""

    backend: FhirBackend
    normalizer: Normalizer | None
    max_attempts: int
    retry_max_delay: float


@dataclass(frozen=True, slots=True)
class Hook:
    """What the edge needs of one backend's webhook."""

    backend: str
    signing: Signing
    reader: EventReader
    max_body_bytes: int


class Webhooks:
    """The backends' hooks, the recorded events and the fetcher that works them off."""

    def __init__(self, hooks: Mapping[str, Hook], events: WebhookEvents,
                 fetcher: Fetcher, metrics: WebhookMetrics | None = None) -> None:
        self.hooks = dict(hooks)
        self.events = events
        self.fetcher = fetcher
        self.metrics = metrics

    def count(self, backend: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.count(backend, outcome)

    def hook(self, backend: str) -> Hook | None:
        return self.hooks.get(backend)

    async def record(self, hook: Hook, changed: ChangedResource) -> bool:
        """Keep the event (durably) and wake the fetcher; False: a replay, nothing done."""
        new = await self.events.record(hook.backend, changed.event_id, changed.kind,
                                       changed.resource_type, changed.path)
        if new:
            self.fetcher.wake(hook.backend)
        self.count(hook.backend, "accepted" if new else "replayed")
        return new


Outcome = Literal["done", "unchanged", "gone", "deleted", "failed", "retry"]


def is_deletion(kind: str) -> bool:
    """A kind of event that announces a deletion (`resource.deleted`,
    `appointment.deleted`): a 404 from the backend then confirms it."""
    return kind.endswith(".deleted")


class Fetcher:
    """Fetches the resource of each recorded event and stores it: one loop per backend,
    so a backend that is slow or down delays only its own events; within a backend, in
    receipt order (one event at a time), so two events for one resource apply in the
    order they came."""

    def __init__(self, events: WebhookEvents, sources: Mapping[str, Source],
                 store: FhirStore, *, idle: float = IDLE,
                 metrics: WebhookMetrics | None = None) -> None:
        self._metrics = metrics
        self._events = events
        self._sources = dict(sources)
        self._store = store
        self._idle = idle
        self._wakes = {name: asyncio.Event() for name in self._sources}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._abandon(), name="webhook-orphans")]
        self._tasks += [loop.create_task(self._run(name), name=f"webhook-fetcher-{name}")
                        for name in self._sources]

    def wake(self, backend: str | None = None) -> None:
        """Look for due events now: one backend's (its loop), or every backend's."""
        for name, wake in self._wakes.items():
            if backend is None or name == backend:
                wake.set()

    async def close(self) -> None:
        """Stop after the events in hand (the others stay pending for the next start)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _abandon(self) -> None:
        """Events of a backend that left the config: nothing would fetch them; failed, so
        `isthmus webhooks list --status failed` shows them to an operator."""
        try:
            if abandoned := await self._events.abandon(tuple(self._sources),
                                                       "backend not configured"):
                log.warning("webhook events: %d of backends no longer configured failed",
                            abandoned)
        except StoreUnavailable as exc:
            log.warning("webhook events: store unavailable (%s)", exc)

    async def _run(self, backend: str) -> None:
        wake = self._wakes[backend]
        while True:
            try:
                await self.drain(backend)
                wait = await self._events.next_due(backend)
            except StoreUnavailable as exc:
                log.warning("webhook events: store unavailable (%s)", exc)
                wait = 1.0
            except Exception as exc:  # a bug costs a pause, never the fetcher
                # The type alone: an exception's text may quote what it was handling.
                log.error("webhook fetcher failed: %s", type(exc).__name__)
                wait = 1.0
            wake.clear()
            timeout = self._idle if wait is None else min(max(wait, 0.05), self._idle)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)

    async def drain(self, backend: str | None = None) -> int:
        """Work off every due event of one backend (None: of each backend in turn); how
        many were handled."""
        if backend is None:
            return sum([await self.drain(name) for name in self._sources])
        handled = 0
        while batch := await self._events.claim(BATCH, LEASE, backend):
            for event in batch:
                outcome = await self.handle(event)
                if self._metrics is not None:
                    self._metrics.count(event.backend,
                                        "retried" if outcome == "retry" else outcome)
                handled += 1
        return handled

    async def handle(self, event: WebhookEvent) -> Outcome:
        source = self._sources.get(event.backend)
        if source is None:  # its backend left the config: kept for an operator
            await self._events.finish(event.id, "failed", "backend not configured")
            return "failed"
        try:
            response = await source.backend.request("GET", event.resource)
        except (BackendUnavailable, BackendTimeout) as exc:
            return await self._retry(event, source, exc.reason, exc.retry_after)
        if response.status in _GONE:
            return await self._gone(event, source, response.status)
        if response.status in _RETRY_STATUSES or response.status >= 500:
            return await self._retry(event, source, f"HTTP {response.status}",
                                     parse_retry_after(response.headers.get("Retry-After")))
        if response.status != 200:
            await self._events.finish(event.id, "failed", f"HTTP {response.status}")
            return "failed"
        return await self._store_answer(event, source, response)

    async def _gone(self, event: WebhookEvent, source: Source, status: int) -> Outcome:
        """The backend no longer has the resource. A 410 says it was deleted, as does a
        404 for an event whose kind is a deletion: the local copy is deleted too (a store
        delete: a deletion version in its history, gone from searches). A bare 404 may be
        a resource the backend never had (the local copy may have come another way): kept."""
        if status != 410 and not is_deletion(event.kind):
            await self._events.finish(event.id, "gone", f"HTTP {status}; local copy kept")
            return "gone"
        type_, _, id = event.resource.partition("/")
        try:
            current = await self._store.read(type_, id)
            if current is None or current.deleted:
                await self._events.finish(event.id, "gone", f"HTTP {status}; no local copy")
                return "gone"
            await self._store.transact([WriteRequest("DELETE", type_, id=id)])
        except StoreUnavailable:
            return await self._retry(event, source, "local store unavailable", None)
        except WriteConflict as exc:
            await self._events.finish(event.id, "failed", f"store refused ({exc.status})")
            return "failed"
        await self._events.finish(event.id, "gone", f"HTTP {status}; deleted locally")
        return "deleted"

    async def _store_answer(self, event: WebhookEvent, source: Source,
                            response: FhirResponse) -> Outcome:
        try:
            resource = self._resource(event, source, response)
        except InvalidResource as exc:
            where = f"{exc.resource_type}.{exc.path}" if exc.path else exc.resource_type
            await self._events.finish(event.id, "failed", f"not valid R4: {where}")
            return "failed"
        except ValueError as exc:
            await self._events.finish(event.id, "failed", str(exc))
            return "failed"
        try:
            outcomes = await self._store.transact([WriteRequest(
                "PUT", event.resource_type, id=resource["id"], resource=resource)])
        except StoreUnavailable:
            return await self._retry(event, source, "local store unavailable", None)
        except WriteConflict as exc:
            await self._events.finish(event.id, "failed", f"store refused ({exc.status})")
            return "failed"
        outcome = outcomes[0]
        changed = not isinstance(outcome, WriteConflict) and outcome.changed
        await self._events.finish(event.id, "done", "" if changed else "unchanged")
        return "done" if changed else "unchanged"

    def _resource(self, event: WebhookEvent, source: Source,
                  response: FhirResponse) -> dict[str, Any]:
        """The answer as the local store keeps it: the vendor table applied, valid R4,
        the resource the event named (ValueError or InvalidResource otherwise)."""
        try:
            document = jsonio.loads(response.body)
        except ValueError:
            raise ValueError("the backend's answer is not JSON") from None
        if not isinstance(document, dict) or document.get("resourceType") != (
                event.resource_type):
            raise ValueError(f"the backend's answer is not a {event.resource_type}")
        if document.get("id") != event.resource.partition("/")[2]:
            raise ValueError("the backend's answer is another resource")
        if source.normalizer is not None:
            source.normalizer.apply(document, in_place=True,
                                    repair=source.backend.spec.validation == "repair")
        meta = document.get("meta")
        if isinstance(meta, dict):  # the local store numbers its own versions
            meta.pop("versionId", None)
            meta.pop("lastUpdated", None)
            if not meta:
                del document["meta"]
        validate_resource(document)
        return document

    async def _retry(self, event: WebhookEvent, source: Source, reason: str,
                     after: float | None) -> Outcome:
        attempts = event.attempts + 1
        if attempts >= source.max_attempts:
            await self._events.finish(event.id, "failed", f"{reason}; out of attempts")
            log.warning("webhook event %d from %s failed after %d attempts: %s",
                        event.id, event.backend, attempts, reason)
            return "failed"
        delay = retry_delay(attempts, _BACKOFF_BASE, source.retry_max_delay, after)
        await self._events.retry(event.id, delay, reason)
        log.info("webhook event %d from %s: %s; retry in %.1f s", event.id, event.backend,
                 reason, delay)
        return "retry"
