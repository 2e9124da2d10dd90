"""The event pump: follows the store's change events in order and queues each target's
deliveries in the outbox, then lets the outbox deliver them.

One batch of events is matched, rendered and queued with the cursor in one transaction,
so a crash repeats at most a batch, and a repeated event is no second delivery (the
outbox row of an (event, target) pair is unique). Subscription resources' own events keep
the matcher up to date (in every process reading the same store) and start the
handshake of a `requested` Subscription: accepted, it is written `active`; refused after
`handshake_attempts`, `error` with the reason. Events of Subscription resources are never
delivered themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import aiohttp
import orjson

from gateway.events.delivery import EventBackend, TargetSpec, handshake, open_session
from gateway.events.matcher import Matcher, Webhook
from gateway.events.payloads import JSON, patient_of, subscription_body, webhook_body
from gateway.events.subscriptions import (
    FHIR_PAYLOAD,
    Owner,
    SubscriptionSpec,
    spec_of,
)
from gateway.fhir import jsonio
from gateway.fhir.search import SearchRegistry
from gateway.forward.outbox import DeliveryPolicy, Dispatcher
from gateway.store.errors import StoreUnavailable
from gateway.store.events import ChangeEvent, EventLog, EventQueue, QueuedDelivery
from gateway.store.fhir import FhirStore, SearchQuery, WriteConflict, WriteRequest

log = logging.getLogger(__name__)

Json = dict[str, Any]


class Gate(Protocol):
    """What a Subscription's owner may be shown (the FHIR edge's read rules)."""

    def view(self, owner: Owner, resource_type: str, resource: Json) -> Json | None:
        """The resource as the owner may read it (cut by its profile); None if it may not."""
        ...


Flatten = Callable[[str, Json], Awaitable[Json | None]]


@dataclass(frozen=True)
class PumpSpec:
    """The pump's settings and targets, built by the composition."""

    webhooks: Sequence[tuple[Webhook, TargetSpec, DeliveryPolicy]]
    # A Subscription owner's signing secret (None: none configured).
    secret_for: Callable[[str], bytes | None]
    policy: DeliveryPolicy = DeliveryPolicy()
    poll_interval: float = 0.2
    batch: int = 500
    handshake_attempts: int = 3
    timeout: float = 10.0
    # How often each target's outbox worker looks for rows an operator retried or
    # dropped (new rows wake it at once): one worker per target, so not too often.
    outbox_poll_interval: float = 10.0
    # Failed delivery attempts in a row after which a Subscription goes to `error`.
    error_after: int = 50
    blind: Callable[[str], str] = lambda key: key


class EventPump:
    """Change events → matched targets → outbox rows; the dispatcher delivers them."""

    def __init__(self, events: EventLog, queue: EventQueue, store: FhirStore,
                 registry: SearchRegistry, dispatcher: Dispatcher, gate: Gate,
                 flatten: Flatten, spec: PumpSpec) -> None:
        self._events = events
        self._queue = queue
        self._store = store
        self._registry = registry
        self._dispatcher = dispatcher
        self._gate = gate
        self._flatten = flatten
        self._spec = spec
        self._matcher = Matcher(registry, [hook for hook, _, _ in spec.webhooks])
        self._attached: dict[str, SubscriptionSpec] = {}
        self._handshakes: dict[str, asyncio.Task[None]] = {}
        self._errors: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._cursor = 0
        self._cursor_written = 0.0
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.events_seen = 0
        self.notifications = 0

    @property
    def matcher(self) -> Matcher:
        return self._matcher

    async def start(self) -> None:
        """Attach the webhooks, load the Subscriptions, then follow the events from the
        cursor (the first start begins at the latest event: history is not notified)."""
        self._session = open_session()
        for _, target, policy in self._spec.webhooks:
            await self._dispatcher.attach(EventBackend(target, self._session), policy,
                                          self._spec.outbox_poll_interval)
        cursor = await self._queue.cursor()
        if cursor is None:
            cursor = await self._events.last_seq()
            await self._queue.enqueue((), cursor)
        self._cursor = cursor
        page = await self._store.search(SearchQuery("Subscription"))
        for stored in page.resources:
            await self._subscription_changed(stored.id, stored.version,
                                             jsonio.loads(stored.body))
        self._task = asyncio.create_task(self._run(), name="event-pump")

    def wake(self) -> None:
        """New events may be there (a local write): read now."""
        self._wake.set()

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            try:
                await self._queue.enqueue((), self._cursor)
            except StoreUnavailable as exc:
                log.error("events: the cursor could not be kept (%s): some events are read "
                          "again at the next start", exc)
        pending = [*self._handshakes.values(), *self._errors.values()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for name in [hook.backend for hook, _, _ in self._spec.webhooks] + [
                spec.backend for spec in self._attached.values()]:
            await self._dispatcher.detach(name)
        if self._session is not None:
            await self._session.close()

    async def drain(self, timeout: float) -> None:
        """Wait until every event written so far is queued (tests and benchmarks)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = await self._events.last_seq()
        while self._cursor < last:
            if loop.time() > deadline:
                raise TimeoutError("the change events were not all queued in time")
            self._wake.set()
            await asyncio.sleep(0.01)

    # -- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            try:
                more = await self.step()
            except StoreUnavailable as exc:
                log.error("events: %s; trying again", exc)
                more = False
            except Exception as exc:  # a bug must not stop every notification: say where
                log.error("events: a batch failed (%s); trying again", type(exc).__name__)
                more = False
            if more:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), self._spec.poll_interval)
            except TimeoutError:
                pass
            self._wake.clear()

    async def step(self) -> bool:
        """Queue one batch of events; whether there may be more."""
        read = await self._events.after(self._cursor, self._spec.batch)
        if not read:
            return False
        # A Subscription's event changes what the events after it match: the batch ends
        # with it, and the rest is judged by the next step.
        end = next((i + 1 for i, e in enumerate(read) if e.resource_type == "Subscription"),
                   len(read))
        events = read[:end]
        # Only the events someone may want are read whole (most writes interest no one).
        wanted = await self._events.with_bodies([
            e for e in events if e.resource_type == "Subscription"
            or self._matcher.wants(e.resource_type, e.action)])
        deliveries: list[QueuedDelivery] = []
        for event in wanted:
            if event.resource_type == "Subscription":
                await self._subscription_event(event)
                continue
            deliveries.extend(await self._deliveries(event))
        now = time.monotonic()
        # The cursor is written with deliveries, else at most once a second: reading a few
        # events again after a crash queues nothing twice.
        if deliveries or now - self._cursor_written >= 1.0:
            await self._queue.enqueue(deliveries, events[-1].seq)
            self._cursor_written = now
        self._cursor = events[-1].seq
        self.events_seen += len(events)
        self.notifications += len(deliveries)
        for name in dict.fromkeys(d.backend for d in deliveries):
            self._dispatcher.queued((name,))
        return end < len(read) or len(read) == self._spec.batch

    async def _deliveries(self, event: ChangeEvent) -> list[QueuedDelivery]:
        # Matched on a quick parse; what is sent keeps FHIR decimals' digits (jsonio).
        quick: Json | None = orjson.loads(event.body) if event.body else None
        hooks = self._matcher.webhooks(event.resource_type, event.action)
        subscriptions = self._matcher.subscriptions(event.resource_type, quick)
        if not hooks and not subscriptions:
            return []
        resource: Json | None = jsonio.loads(event.body) if event.body else None
        key = self._spec.blind(patient_of(self._registry, event, quick))
        found: list[QueuedDelivery] = []
        flat: Json | None = None
        if resource is not None and event.action != "deleted" and any(
                hook.payload == "flat" for hook in hooks):
            flat = await self._flatten(event.resource_type, resource)
        for hook in hooks:
            body = webhook_body(event, flat, with_flat=hook.payload == "flat")
            found.append(QueuedDelivery(event.seq, hook.backend, event.event_id, key, body))
        for spec in subscriptions:
            assert resource is not None
            # Minimum necessary: only what the owner may read, cut as it would be read.
            view = self._gate.view(spec.owner, event.resource_type, resource)
            if view is None:
                continue
            body, _ = subscription_body(event, spec,
                                        None if event.action == "deleted" else view)
            found.append(QueuedDelivery(event.seq, spec.backend, event.event_id, key, body))
        return found

    # -- Subscriptions ------------------------------------------------------------------

    async def _subscription_event(self, event: ChangeEvent) -> None:
        if event.action == "deleted":
            await self._subscription_gone(event.id)
            return
        await self._subscription_changed(event.id, event.version, jsonio.loads(event.body))

    async def _subscription_changed(self, id_: str, version: int, resource: Json) -> None:
        spec = spec_of(self._registry, id_, version, resource)
        if spec is None or spec.status in ("off", "error"):
            await self._subscription_gone(id_)
            return
        if spec.status == "requested":
            await self._subscription_gone(id_)
            self._handshakes[id_] = asyncio.create_task(
                self._handshake(spec, resource), name=f"handshake-{id_}")
            return
        self._matcher.put(spec)
        known = self._attached.get(id_)
        if known is not None and (known.endpoint, known.headers, known.payload) == (
                spec.endpoint, spec.headers, spec.payload):
            self._attached[id_] = spec
            return
        target = self._target(spec)
        if target is None:
            await self._subscription_gone(id_)
            return
        if known is not None:
            await self._dispatcher.detach(spec.backend)
        assert self._session is not None
        self._attached[id_] = spec
        backend = EventBackend(target, self._session,
                               lambda reason: self._failing(id_, reason),
                               self._spec.error_after)
        await self._dispatcher.attach(backend, self._policy(),
                                      self._spec.outbox_poll_interval)

    async def _subscription_gone(self, id_: str) -> None:
        """Off, in error, deleted or waiting for its handshake: nothing more is matched or
        sent (what is queued stays in the outbox for an operator)."""
        self._matcher.remove(id_)
        task = self._handshakes.pop(id_, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        spec = self._attached.pop(id_, None)
        if spec is not None:
            await self._dispatcher.detach(spec.backend)

    def _target(self, spec: SubscriptionSpec) -> TargetSpec | None:
        secret = self._spec.secret_for(spec.owner.client_id)
        if secret is None:
            return None
        content_type = FHIR_PAYLOAD if spec.payload == FHIR_PAYLOAD else JSON
        return TargetSpec(spec.backend, spec.endpoint, secret, content_type, spec.headers,
                          self._spec.timeout)

    async def _handshake(self, spec: SubscriptionSpec, resource: Json) -> None:
        target = self._target(spec)
        assert self._session is not None
        if target is None:
            reason: str | None = "no signing secret is configured for the owning client"
        else:
            reason = await handshake(self._session, replace(target, content_type=JSON),
                                     f"Subscription/{spec.id}",
                                     self._spec.handshake_attempts)
        updated = {k: v for k, v in resource.items() if k not in ("meta", "error")}
        updated["status"] = "active" if reason is None else "error"
        if reason is not None:
            updated["error"] = reason
            log.warning("Subscription %s: %s", spec.id, reason)
        try:
            # If-Match: a client's change meanwhile wins (and is handshaken in its turn).
            await self._store.transact([WriteRequest("PUT", "Subscription", spec.id,
                                                     updated, if_match=spec.version)])
        except WriteConflict:
            pass
        except StoreUnavailable as exc:
            log.error("Subscription %s: the status could not be written: %s", spec.id, exc)
        self._handshakes.pop(spec.id, None)
        self._wake.set()

    def _failing(self, id_: str, reason: str) -> None:
        """A Subscription's deliveries keep failing: put it in `error` (from the loop)."""
        if id_ not in self._errors:
            self._errors[id_] = asyncio.create_task(self._set_error(id_, reason),
                                                    name=f"subscription-error-{id_}")

    async def _set_error(self, id_: str, reason: str) -> None:
        try:
            stored = await self._store.read("Subscription", id_)
            if stored is None or stored.deleted:
                return
            resource = jsonio.loads(stored.body)
            if resource.get("status") != "active":
                return
            updated = {k: v for k, v in resource.items() if k != "meta"}
            updated["status"], updated["error"] = "error", reason
            log.warning("Subscription %s: %s", id_, reason)
            await self._store.transact([WriteRequest("PUT", "Subscription", id_, updated,
                                                     if_match=stored.version)])
        except WriteConflict:
            pass  # changed meanwhile: the change decides
        except StoreUnavailable as exc:
            log.error("Subscription %s: the status could not be written: %s", id_, exc)
        finally:
            self._errors.pop(id_, None)
            self._wake.set()

    def _policy(self) -> DeliveryPolicy:
        return self._spec.policy
