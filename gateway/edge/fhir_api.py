"""The FHIR edge's context: the store, the search table, the caller's limits, and the
checks every route makes: which types exist, what a principal's scopes and profile allow,
which patient's compartment confines it, how a resource is cut for it, and how the access
is recorded in the audit trail.

Beside it, one request against it (`Call`) and the interface both answerers implement
(`Interactions`: the local store in `fhir_local`, a remote backend in `fhir_proxy`), with
the `Facade` protocol that picks the remote one: the routes depend on these, never on the
concrete facade."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import orjson
from aiohttp import web

from gateway.audit.log import AuditLog
from gateway.audit.record import AuditRecord
from gateway.events.subscriptions import SubscriptionRules
from gateway.fhir import jsonio
from gateway.fhir.capability import capability_statement
from gateway.fhir.model import is_resource_type, required_elements
from gateway.fhir.outcome import FhirError
from gateway.fhir.search import SearchError, SearchRegistry
from gateway.policy.principal import Principal
from gateway.policy.profiles import Profile, tag_subsetted
from gateway.store.errors import StoreUnavailable
from gateway.store.fhir import (
    Clause,
    FhirStore,
    IdMatch,
    Match,
    ReferenceMatch,
    StoredResource,
    WriteConflict,
    WriteOutcome,
    WriteRequest,
)
from gateway.telemetry import Telemetry

log = logging.getLogger(__name__)

Outcomes = list[WriteOutcome | WriteConflict]


@dataclass(frozen=True, slots=True)
class FhirLimits:
    """The edge's limits, from the `fhir` config section (the edge does not read config)."""

    base_url: str = ""
    max_body_bytes: int = 10 * 1024 * 1024
    max_depth: int = 32
    max_array_items: int = 10_000
    default_count: int = 50
    max_count: int = 1000
    max_bundle_entries: int = 1000
    audit_reads: str = "durable"  # durable | queued | off
    rate_limit_per_client: float = 0.0
    search_handling: str = "lenient"  # lenient | strict, when the request does not say


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class Facade(Protocol):
    """Which requests a remote FHIR backend answers (implemented by `fhir_proxy.Facade`)."""

    def served_by(self, resource_type: str, interaction: str) -> str | None:
        """The name of the backend that answers this interaction on this type; None: the
        local store."""
        ...

    def remote(self, resource_type: str, interaction: str) -> Interactions | None:
        """The answerer for a request whose type a backend serves; None: the local store."""
        ...


@runtime_checkable
class OperationFacade(Protocol):
    """A facade that also proxies the operations its backends' vendor tables declare
    (implemented by `fhir_proxy.Facade`)."""

    def operation(self, resource_type: str, name: str, level: str) -> Any:
        """(answerer, declared operation) for `$name` at `level` ("type" or "instance")
        of this type; None when no backend serving the type offers it."""
        ...


@dataclass
class FhirApi:
    """Everything the routes need, built once by the composition."""

    store: FhirStore
    registry: SearchRegistry
    telemetry: Telemetry
    limits: FhirLimits = FhirLimits()
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    audit: AuditLog | None = None
    types: frozenset[str] = frozenset()
    capability: bytes = b""
    # The same statement as a document, for the per-request SMART token endpoint.
    capability_document: Mapping[str, Any] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _audit_behind: bool = False
    # Types routed to a remote FHIR backend are proxied by this (None: all local).
    facade: Facade | None = None
    # How Subscription writes are checked and owned (None: stored as any resource).
    subscriptions: SubscriptionRules | None = None

    @classmethod
    def build(cls, store: FhirStore, registry: SearchRegistry, telemetry: Telemetry,
              limits: FhirLimits, profiles: Mapping[str, Profile],
              audit: AuditLog | None, extra_types: Iterable[str] = (),
              facade: Facade | None = None) -> FhirApi:
        types = frozenset(registry.types()) | frozenset(extra_types)
        api = cls(store, registry, telemetry, limits, profiles, audit, types)
        api.capability_document = capability_statement(registry, types)
        api.capability = orjson.dumps(api.capability_document)
        api.facade = facade
        return api

    # -- who may do what --------------------------------------------------------------

    def throttle(self, principal: Principal) -> None:
        """Token bucket per client: 429 with Retry-After when it runs dry."""
        rate = self.limits.rate_limit_per_client
        if not rate:
            return
        now = time.monotonic()
        bucket = self._buckets.get(principal.client_id)
        burst = max(2 * rate, 1.0)
        if bucket is None:
            bucket = self._buckets[principal.client_id] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens < 1:
            wait = max(1, int((1 - bucket.tokens) / rate + 0.999))
            raise FhirError(429, "too many requests for this client; retry later",
                            headers={"Retry-After": str(wait)})
        bucket.tokens -= 1

    def check_type(self, resource_type: str) -> None:
        if resource_type not in self.types:
            # Named only when it is an R4 type: any other path segment could be a value
            # (a name typed where the type goes) and is not echoed.
            shown = resource_type if is_resource_type(resource_type) else "in this URL"
            raise FhirError(404, f"resource type {shown} is not supported here",
                            code="not-supported")

    def profile(self, principal: Principal) -> Profile | None:
        return self.profiles.get(principal.profile) if principal.profile else None

    def authorize(self, principal: Principal, interaction: str, resource_type: str) -> None:
        """403 unless a scope permits the interaction and the profile shows the type."""
        if not principal.scopes.permits(interaction, resource_type):
            raise FhirError(403, f"no granted scope permits {interaction} on {resource_type}")
        profile = self.profile(principal)
        if profile is not None and not profile.allows_type(resource_type):
            raise FhirError(403, f"the task profile '{profile.name}' does not include "
                            f"{resource_type}")
        if principal.scopes.is_patient_context(resource_type) and principal.patient is None:
            raise FhirError(403, "a patient-level scope needs a patient context")

    def confined_to(self, principal: Principal, resource_type: str) -> str | None:
        """The patient ('Patient/123') whose compartment confines this type, if any."""
        if principal.patient is None or not principal.scopes.is_patient_context(resource_type):
            return None
        if resource_type != "Patient" and not self.registry.compartment_params(resource_type):
            return None  # outside the patient compartment (Practitioner, Location...)
        return principal.patient

    def compartment_clause(self, resource_type: str, patient: str) -> tuple[Match, ...]:
        if resource_type == "Patient":
            return (IdMatch(patient.partition("/")[2]),)
        return tuple(ReferenceMatch(param, patient)
                     for param in self.registry.compartment_params(resource_type))

    def patients_of(self, resource_type: str, resource: Mapping[str, Any]) -> set[str]:
        """The patients ('Patient/id') whose compartment holds this resource."""
        return self.registry.patients(resource_type, dict(resource))

    def in_compartment(self, resource_type: str, resource: Mapping[str, Any],
                       patient: str) -> bool:
        return patient in self.patients_of(resource_type, resource)

    def only_about(self, resource_type: str, resource: Mapping[str, Any],
                   patient: str) -> bool:
        """Whether every patient this resource is about (its compartment's subject
        parameters, not a performer, asserter or author) is `patient`: what a
        patient-confined caller may write, and what its write may replace."""
        return self.registry.about(resource_type, dict(resource)) == {patient}

    def visibility(self, principal: Principal, interaction: str,
                   resource_type: str) -> Visibility:
        """What this caller may be shown of this type by `interaction` (read, vread,
        history, search): the one predicate every read path applies to every version."""
        alternatives: list[tuple[Clause, ...]] = []
        for constraint in principal.scopes.constraints_for(interaction, resource_type):
            try:
                parsed = self.registry.parse(resource_type, list(constraint),
                                             default_count=1, max_count=1)
            except SearchError:
                raise FhirError(403, "the granted scope's constraint names a search "
                                f"parameter {resource_type} does not have here") from None
            alternatives.append(parsed.query.clauses)
        return Visibility(self.registry, resource_type,
                          self.confined_to(principal, resource_type), tuple(alternatives))

    def scope_clauses(self, principal: Principal, interaction: str,
                      resource_type: str) -> tuple[tuple[Match, ...], ...]:
        """`?param=value` constraints on the granted scopes, as search clauses."""
        alternatives = principal.scopes.constraints_for(interaction, resource_type)
        if not alternatives:
            return ()
        if len(alternatives) == 1:
            params = list(alternatives[0])
            return self.registry.parse(resource_type, params, default_count=1,
                                       max_count=1).query.clauses
        # Several alternatives: OR of single-parameter constraints is one clause; anything
        # richer cannot be expressed and is refused rather than widened.
        matches: list[Match] = []
        for alternative in alternatives:
            if len(alternative) != 1:
                raise FhirError(403, "the granted scopes' constraints are too complex to "
                                "apply to this search")
            parsed = self.registry.parse(resource_type, list(alternative), default_count=1,
                                         max_count=1)
            for clause in parsed.query.clauses:
                matches.extend(clause)
        return (tuple(matches),)

    # -- shaping what goes out ----------------------------------------------------------

    def shaped(self, principal: Principal, stored: StoredResource,
               elements: Sequence[str] | None = None) -> bytes:
        """The stored bytes, cut by the profile and `_elements` when either applies."""
        profile = self.profile(principal)
        whole = profile is None or profile.is_whole(stored.resource_type)
        if whole and not elements:
            return stored.body
        resource: dict[str, Any] = jsonio.loads(stored.body)  # decimals keep their digits
        if not whole:
            assert profile is not None
            resource = profile.filter(resource)
        if elements:
            resource = _only_elements(resource, elements)
        return jsonio.dumps(resource)

    def shaped_resource(self, principal: Principal, resource: dict[str, Any],
                        elements: Sequence[str] | None = None) -> dict[str, Any]:
        """A resource that is not stored here (a backend's answer) cut by the profile and
        `_elements`, as `shaped` cuts stored bytes; the same object when neither applies."""
        profile = self.profile(principal)
        resource_type = str(resource.get("resourceType"))
        if profile is not None and not profile.is_whole(resource_type):
            resource = profile.filter(resource)
        if elements:
            resource = _only_elements(resource, elements)
        return resource

    def base(self, request: web.Request) -> str:
        return self.limits.base_url.rstrip("/") or f"{request.scheme}://{request.host}/fhir"

    # -- the audit trail ---------------------------------------------------------------

    async def record_read(self, records: Sequence[AuditRecord]) -> None:
        """Record reads and searches as `audit_reads` says. Queued: answer without
        waiting for the commit; if a queued record then fails, the following reads wait
        for theirs (fail closed again) until one commits."""
        mode = self.limits.audit_reads
        if mode == "off" or self.audit is None:
            return
        if mode == "durable" or self._audit_behind:
            await self.record(records)
            self._audit_behind = False
            return
        for record in records:
            self.audit.submit(record).add_done_callback(self._queued_done)

    def _queued_done(self, future: asyncio.Future[tuple[int, bytes]]) -> None:
        if future.cancelled() or future.exception() is not None:
            if not self._audit_behind:
                log.error("a queued read record could not be committed; reads wait for "
                          "their records again")
            self._audit_behind = True

    async def record(self, records: Sequence[AuditRecord]) -> None:
        """Commit the access records before answering; 503 if they cannot be kept."""
        if self.audit is None or not records:
            return
        futures = [self.audit.submit(r) for r in records]
        for future in futures:
            try:
                await future
            except StoreUnavailable:
                raise FhirError(503, "the access could not be recorded; try again later",
                                headers={"Retry-After": "5"}) from None


    async def transact(self, writes: Sequence[WriteRequest],
                       records: Callable[[Outcomes], Sequence[AuditRecord]], *,
                       atomic: bool = True) -> Outcomes:
        """Apply writes so that none is readable before its audit records are durable.

        A write is a PHI access, on record first (fail closed), like a read: the store
        awaits `records(outcomes)` between applying the writes and committing them, and a
        record that cannot be kept rolls them back, so a 503 means nothing was written
        and the client's retry cannot make a duplicate. Records kept for writes that were
        then not committed (a failed commit; the call run again because another call in
        its group commit could not be recorded) are followed by a `rolled-back` record
        (best effort): the trail may over-state, never under-state, what was written.
        """
        kept: list[AuditRecord] = []

        def rolled_back() -> None:
            if self.audit is not None:
                for record in kept:
                    self.audit.submit(record._replace(
                        outcome="rolled-back", detail="not committed")
                    ).add_done_callback(_ignored)
            kept.clear()

        async def before_commit(outcomes: Outcomes) -> None:
            rolled_back()  # called again: the earlier attempt was rolled back
            made = records(outcomes)
            await self.record(made)
            kept.extend(made)

        try:
            return await self.store.transact(writes, atomic=atomic,
                                             before_commit=before_commit)
        except StoreUnavailable:
            rolled_back()
            raise


def _ignored(future: asyncio.Future[tuple[int, bytes]]) -> None:
    """A best-effort record's failure is already counted and logged by the audit log."""
    if not future.cancelled():
        future.exception()


FHIR = web.AppKey("fhir", FhirApi)


@dataclass(frozen=True, slots=True)
class Visibility:
    """What one caller may be shown of one type: a version inside its patient's
    compartment (when confined) that meets one of its scopes' constraint sets (when
    constrained). Read, vread, history, batch reads and the facade's reads judge every
    version they return by it; searches carry the same limits as store clauses
    (`fhir_request.confined`), which the store judges alike."""

    registry: SearchRegistry
    resource_type: str
    patient: str | None = None
    alternatives: tuple[tuple[Clause, ...], ...] = ()  # () when unconstrained

    @property
    def unrestricted(self) -> bool:
        return self.patient is None and not self.alternatives

    def shows(self, resource: Mapping[str, Any]) -> bool:
        if self.unrestricted:
            return True
        body = dict(resource)
        if self.patient is not None and self.patient not in self.registry.patients(
                self.resource_type, body):
            return False
        # A constraint that cannot be judged in memory (a date, a quantity) hides the
        # version: fail closed rather than show what the scope may exclude.
        return not self.alternatives or any(
            self.registry.matches(self.resource_type, body, clauses) is True
            for clauses in self.alternatives)

    def shows_stored(self, stored: StoredResource) -> bool:
        """A stored version; a deletion marker says nothing the limits could be judged
        on, so only an unrestricted caller is shown one by itself."""
        if stored.deleted:
            return self.unrestricted
        return self.unrestricted or self.shows(orjson.loads(stored.body))


@dataclass(slots=True)
class Call:
    """One request's context: the caller, and what the audit records will say."""

    api: FhirApi
    request: web.Request
    principal: Principal
    interaction: str = ""
    resource_type: str = ""


Pairs = list[tuple[str, str]]


class Interactions(Protocol):
    """The FHIR interactions on one type, answered by the local store or a remote backend
    under the same checks; the route decides which once per request."""

    async def read(self, call: Call) -> web.StreamResponse: ...

    async def vread(self, call: Call) -> web.StreamResponse: ...

    async def history(self, call: Call) -> web.Response: ...

    async def search(self, call: Call, params: Pairs) -> web.Response: ...

    async def create(self, call: Call) -> web.Response: ...

    async def update(self, call: Call) -> web.Response: ...

    async def conditional_update(self, call: Call) -> web.Response: ...

    async def delete(self, call: Call) -> web.Response: ...

    async def conditional_delete(self, call: Call) -> web.Response: ...


def _only_elements(resource: dict[str, Any], elements: Sequence[str]) -> dict[str, Any]:
    """_elements: the named top-level elements plus resourceType, id, meta and what the
    R4 model requires of the type (FHIR R4 search.html §3.1.1.5.9: "servers SHOULD
    return mandatory elements"), tagged SUBSETTED when something was left out."""
    required = required_elements(str(resource.get("resourceType")))
    keep = {"resourceType", "id", "meta", *elements, *required,
            *("_" + name for name in required)}
    out = {k: v for k, v in resource.items() if k in keep}
    if len(out) < len(resource):
        out["meta"] = tag_subsetted(out.get("meta"))
    return out
