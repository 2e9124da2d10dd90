"""FHIR R4 Subscription resources: checked and owned on the way in, read back as specs.

A Subscription is stored like any resource. On create or update the gateway checks what
it can act on (criteria a search on one type the store keeps, judged in memory; channel
rest-hook; an endpoint it may post to; a payload it knows), sets the status (`requested`
until the handshake, or `off` if the client says so) and records its owner: the creating
client's id, granted scopes, patient context and task profile, in a server-managed
extension. Notifications are then cut to what that owner may read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from gateway.events.endpoints import url_problem
from gateway.fhir.search import SearchError, SearchRegistry
from gateway.policy.principal import Principal
from gateway.store.fhir import Clause

OWNER_URL = "urn:isthmus:subscription-owner"
FHIR_PAYLOAD = "application/fhir+json"
PAYLOADS = ("", FHIR_PAYLOAD)
STATUSES = ("requested", "active", "error", "off")
# Headers the gateway sets itself: a channel header may not replace them.
_RESERVED = frozenset({"content-type", "content-length", "host", "x-isthmus-signature",
                       "x-isthmus-event-id", "x-isthmus-event"})


class SubscriptionError(Exception):
    """A Subscription the gateway cannot act on: its status (400, 403) and the element."""

    def __init__(self, status: int, reason: str, element: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.element = element


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose Subscription it is: what notifications may show is what this caller may read."""

    client_id: str
    scopes: str
    patient: str | None = None
    profile: str | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    """A stored Subscription as the pump acts on it."""

    id: str
    version: int
    status: str
    resource_type: str
    clauses: tuple[Clause, ...]
    endpoint: str
    headers: tuple[tuple[str, str], ...]
    payload: str  # "" (ids only) or FHIR_PAYLOAD
    owner: Owner

    @property
    def backend(self) -> str:
        """The outbox backend name of its deliveries."""
        return f"subscription:{self.id}"


@dataclass(frozen=True)
class SubscriptionRules:
    """What the edge checks a Subscription against (built by the composition)."""

    registry: SearchRegistry
    allow_insecure_http: bool
    # Whether a signing secret is configured for this client.
    has_secret: Callable[[str], bool]
    # Whether this caller may read this type (its scopes and profile).
    may_read: Callable[[Principal, str], bool]

    def accept(self, resource: dict[str, Any], principal: Principal) -> dict[str, Any]:
        """The Subscription to store: checked, its status set, owned by `principal`;
        SubscriptionError if the gateway cannot act on it."""
        resource_type, _ = criteria(self.registry, resource.get("criteria"))
        if not self.may_read(principal, resource_type):
            raise SubscriptionError(403, f"no granted scope lets this client read "
                                    f"{resource_type}", "Subscription.criteria")
        channel = resource.get("channel")
        if not isinstance(channel, dict) or channel.get("type") != "rest-hook":
            raise SubscriptionError(400, "only channel type rest-hook is supported",
                                    "Subscription.channel.type")
        endpoint = channel.get("endpoint")
        problem = (url_problem(endpoint, self.allow_insecure_http)
                   if isinstance(endpoint, str) else "is missing")
        if problem is not None:
            raise SubscriptionError(400, f"the endpoint {problem}",
                                    "Subscription.channel.endpoint")
        if channel.get("payload", "") not in PAYLOADS:
            raise SubscriptionError(400, "the payload must be application/fhir+json or "
                                    "absent (ids only)", "Subscription.channel.payload")
        channel_headers(channel.get("header", []))
        if not self.has_secret(principal.client_id):
            raise SubscriptionError(400, "no signing secret is configured for this client "
                                    "(events.client_secret_env)", "Subscription")
        accepted = {k: v for k, v in resource.items() if k not in ("error", "extension")}
        accepted["extension"] = [e for e in resource.get("extension", [])
                                 if isinstance(e, dict) and e.get("url") != OWNER_URL]
        accepted["extension"].append(_owner_extension(principal))
        accepted["status"] = "off" if resource.get("status") == "off" else "requested"
        return accepted


def criteria(registry: SearchRegistry, value: object) -> tuple[str, tuple[Clause, ...]]:
    """`Type?param=value&...` as a resource type and store clauses; SubscriptionError if it
    is not a search on one type the store keeps that a change can be judged against."""
    element = "Subscription.criteria"
    if not isinstance(value, str) or not value:
        raise SubscriptionError(400, "criteria is missing", element)
    resource_type, _, query = value.partition("?")
    if resource_type not in registry.types() or resource_type == "Subscription":
        raise SubscriptionError(400, "criteria must search a resource type the store keeps",
                                element)
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(name.startswith("_") and name != "_id" for name, _ in pairs):
        raise SubscriptionError(400, "criteria may not use result parameters (_count, "
                                "_sort, _include...)", element)
    try:
        parsed = registry.parse(resource_type, pairs, default_count=1, max_count=1)
    except SearchError as exc:
        raise SubscriptionError(400, f"criteria: {exc}", element) from None
    clauses = parsed.query.clauses
    # A clause this cannot judge in memory (a date, a quantity) never matches: refuse it
    # now rather than notify nothing.
    if any(registry.matches(resource_type, {"resourceType": resource_type}, (clause,))
           is None for clause in clauses):
        raise SubscriptionError(400, "criteria uses a parameter a change cannot be matched "
                                "against (dates and quantities are not supported)", element)
    return resource_type, clauses


def channel_headers(value: object) -> tuple[tuple[str, str], ...]:
    """`channel.header` ("Name: value" strings) as pairs; SubscriptionError if malformed."""
    element = "Subscription.channel.header"
    if not isinstance(value, list):
        raise SubscriptionError(400, "header must be a list of 'Name: value'", element)
    headers: list[tuple[str, str]] = []
    for item in value:
        name, colon, text = item.partition(":") if isinstance(item, str) else ("", "", "")
        name = name.strip()
        if not colon or not name or not name.isascii() or " " in name or "\n" in text \
                or "\r" in text:
            raise SubscriptionError(400, "a header is not 'Name: value'", element)
        if name.lower() in _RESERVED:
            raise SubscriptionError(400, f"the header {name} is set by the gateway", element)
        headers.append((name, text.strip()))
    return tuple(headers)


def spec_of(registry: SearchRegistry, id_: str, version: int,
            resource: Mapping[str, Any]) -> SubscriptionSpec | None:
    """A stored Subscription as a spec; None when it has no owner or no longer parses
    (the search table changed): such a Subscription notifies nothing."""
    owner = _owner(resource.get("extension"))
    channel = resource.get("channel")
    if owner is None or not isinstance(channel, dict):
        return None
    try:
        resource_type, clauses = criteria(registry, resource.get("criteria"))
        headers = channel_headers(channel.get("header", []))
    except SubscriptionError:
        return None
    return SubscriptionSpec(id_, version, str(resource.get("status", "")), resource_type,
                            clauses, str(channel.get("endpoint", "")), headers,
                            str(channel.get("payload", "")), owner)


def _owner_extension(principal: Principal) -> dict[str, Any]:
    parts = [("client", principal.client_id), ("scope", principal.scopes.to_text()),
             ("patient", principal.patient or ""), ("profile", principal.profile or "")]
    return {"url": OWNER_URL,
            "extension": [{"url": name, "valueString": value}
                          for name, value in parts if value]}


def _owner(extensions: object) -> Owner | None:
    if not isinstance(extensions, list):
        return None
    for extension in extensions:
        if isinstance(extension, dict) and extension.get("url") == OWNER_URL:
            values = {str(e.get("url")): str(e.get("valueString", ""))
                      for e in _dicts(extension.get("extension"))}
            if not values.get("client"):
                return None
            return Owner(values["client"], values.get("scope", ""),
                         values.get("patient") or None, values.get("profile") or None)
    return None


def _dicts(value: object) -> Sequence[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
