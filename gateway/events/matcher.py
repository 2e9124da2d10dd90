"""Which targets a change event goes to: the webhooks listening for its name, and the
active Subscriptions whose criteria the changed resource meets.

Kept cheap for many Subscriptions: they are indexed by resource type, their criteria
parsed once, the changed resource indexed once per event (not once per Subscription), and
a Subscription with a parameter that names one reference or one code
(`Appointment?patient=Patient/1`, `Observation?code=1234-5&status=final`, the usual
shapes) is found by a dictionary lookup on the resource's index rows and only then judged
whole, so an event costs in proportion to the Subscriptions it may match, not to all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.events.catalogue import event_name
from gateway.events.subscriptions import SubscriptionSpec
from gateway.fhir.search import SearchRegistry
from gateway.fhir.search.index import judge
from gateway.store.fhir import (
    IndexEntry,
    ReferenceIndex,
    ReferenceMatch,
    TokenIndex,
    TokenMatch,
)


@dataclass(frozen=True, slots=True)
class Webhook:
    """A `[[webhooks]]` entry as the pump needs it."""

    name: str
    events: frozenset[str]
    payload: str  # "ids" | "flat"

    @property
    def backend(self) -> str:
        return f"webhook:{self.name}"


@dataclass(slots=True)
class _TypeIndex:
    """One resource type's active Subscriptions."""

    # (param, reference target or code) -> the Subscriptions one of whose criteria is
    # exactly that (the rest judged once found).
    by_key: dict[tuple[str, str], dict[str, SubscriptionSpec]] = field(
        default_factory=dict)
    general: dict[str, SubscriptionSpec] = field(default_factory=dict)
    # The search parameters their criteria use: only these are indexed for a change.
    params: frozenset[str] = frozenset()

    def specs(self) -> list[SubscriptionSpec]:
        found = list(self.general.values())
        for bucket in self.by_key.values():
            found.extend(bucket.values())
        return found


class Matcher:
    """The targets of each change event; Subscriptions are added and removed as their
    own change events (or the start-up read) say."""

    def __init__(self, registry: SearchRegistry, webhooks: Sequence[Webhook]) -> None:
        self._registry = registry
        self._webhooks: dict[str, list[Webhook]] = {}
        for hook in webhooks:
            for event in hook.events:
                self._webhooks.setdefault(event, []).append(hook)
        self._types: dict[str, _TypeIndex] = {}
        self._where: dict[str, tuple[str, tuple[str, str] | None]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def put(self, spec: SubscriptionSpec) -> None:
        """Match this Subscription from now on (replacing an earlier version of it)."""
        self.remove(spec.id)
        index = self._types.setdefault(spec.resource_type, _TypeIndex())
        key = _lookup_key(spec)
        if key is None:
            index.general[spec.id] = spec
        else:
            index.by_key.setdefault(key, {})[spec.id] = spec
        self._where[spec.id] = (spec.resource_type, key)
        index.params = _params(index.specs())

    def remove(self, subscription_id: str) -> None:
        where = self._where.pop(subscription_id, None)
        if where is None:
            return
        resource_type, key = where
        index = self._types[resource_type]
        if key is None:
            index.general.pop(subscription_id, None)
        else:
            bucket = index.by_key.get(key, {})
            bucket.pop(subscription_id, None)
            if not bucket:
                index.by_key.pop(key, None)
        index.params = _params(index.specs())

    def wants(self, resource_type: str, action: str) -> bool:
        """Whether any target may want this event (else its body is not even read)."""
        return (resource_type in self._types and bool(
            self._types[resource_type].general or self._types[resource_type].by_key)
        ) or event_name(resource_type, action) in self._webhooks

    def webhooks(self, resource_type: str, action: str) -> list[Webhook]:
        return self._webhooks.get(event_name(resource_type, action), [])

    def subscriptions(self, resource_type: str,
                      resource: dict[str, Any] | None) -> list[SubscriptionSpec]:
        """The Subscriptions this version of a resource meets (for a deletion, the version
        deleted); none for a resource with no content to judge."""
        index = self._types.get(resource_type)
        if index is None or resource is None:
            return []
        entries: list[IndexEntry] = self._registry.index(resource_type, resource,
                                                         index.params)
        candidates: dict[str, SubscriptionSpec] = {}
        if index.by_key:
            for entry in entries:
                key = _entry_key(entry)
                if key is not None:
                    candidates.update(index.by_key.get(key, {}))
        candidates.update(index.general)
        return [spec for spec in candidates.values()
                if all(any(judge(match, resource, entries) is True for match in clause)
                       for clause in spec.clauses)]


def _params(specs: list[SubscriptionSpec]) -> frozenset[str]:
    return frozenset(param for spec in specs for clause in spec.clauses for match in clause
                     if isinstance(param := getattr(match, "param", None), str))


def _entry_key(entry: IndexEntry) -> tuple[str, str] | None:
    if isinstance(entry, ReferenceIndex):
        return entry.param, entry.target
    if isinstance(entry, TokenIndex):
        return entry.param, entry.code
    return None


def _lookup_key(spec: SubscriptionSpec) -> tuple[str, str] | None:
    """The key of a criterion that must hold and names one reference or one code."""
    for clause in spec.clauses:
        if len(clause) != 1:
            continue
        match = clause[0]
        if isinstance(match, ReferenceMatch):
            return match.param, match.target
        if isinstance(match, TokenMatch) and match.code is not None and not match.negate:
            return match.param, match.code
    return None
