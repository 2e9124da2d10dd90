"""Matching a change against many Subscriptions and webhooks (pure: no store, no socket),
and the delivery signature a receiver checks."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.events.matcher import Matcher, Webhook
from gateway.events.signing import signature, verify
from gateway.events.subscriptions import (
    Owner,
    SubscriptionError,
    SubscriptionSpec,
    criteria,
)
from gateway.fhir.search import SearchRegistry
from gateway.mapping.tables import SHIPPED

REGISTRY = SearchRegistry.load(SHIPPED / "search-parameters.csv")
OWNER = Owner("client", "system/*.rs")


def spec(id_: str, text: str) -> SubscriptionSpec:
    resource_type, clauses = criteria(REGISTRY, text)
    return SubscriptionSpec(id_, 1, "active", resource_type, clauses, "https://x.org/h",
                            (), "", OWNER)


def appointment(patient: str, status: str = "booked") -> dict[str, Any]:
    return {"resourceType": "Appointment", "id": "a1", "status": status,
            "participant": [{"actor": {"reference": patient}, "status": "accepted"}]}


def test_each_subscription_matches_only_what_its_criteria_find() -> None:
    matcher = Matcher(REGISTRY, [])
    for n in range(100):
        matcher.put(spec(f"p{n}", f"Appointment?patient=Patient/{n}"))
    matcher.put(spec("booked", "Appointment?status=booked"))
    matcher.put(spec("both", "Appointment?patient=Patient/7&status=cancelled"))
    matcher.put(spec("obs", "Observation?status=final"))
    found = {s.id for s in matcher.subscriptions("Appointment", appointment("Patient/7"))}
    assert found == {"p7", "booked"}
    found = {s.id for s in matcher.subscriptions(
        "Appointment", appointment("Patient/7", "cancelled"))}
    assert found == {"p7", "both"}
    matcher.remove("p7")
    matcher.put(spec("booked", "Appointment?status=cancelled"))  # replaced, not added
    assert {s.id for s in matcher.subscriptions(
        "Appointment", appointment("Patient/7"))} == set()
    assert not matcher.wants("Patient", "updated")
    assert matcher.wants("Appointment", "deleted")


def test_webhooks_match_by_event_name() -> None:
    hook = Webhook("crm", frozenset({"appointment.created", "patient.updated"}), "ids")
    matcher = Matcher(REGISTRY, [hook])
    assert matcher.webhooks("Appointment", "created") == [hook]
    assert matcher.webhooks("Appointment", "updated") == []
    assert matcher.wants("Patient", "updated") and not matcher.wants("Patient", "created")


@pytest.mark.parametrize("text", ["", "Appointment", "Nope?x=1", "Subscription?status=off",
                                  "Appointment?date=2026-01-01", "Appointment?_count=5",
                                  "Appointment?bogus=1", "Appointment?patient=Patient/1|x"])
def test_criteria_the_gateway_cannot_match_are_refused(text: str) -> None:
    if text == "Appointment":  # a type alone is every change of it: allowed
        assert criteria(REGISTRY, text) == ("Appointment", ())
        return
    with pytest.raises(SubscriptionError) as caught:
        criteria(REGISTRY, text)
    assert caught.value.status == 400 and caught.value.element == "Subscription.criteria"


def test_signature_covers_timestamp_and_body() -> None:
    header = signature(b"k", b"{}", timestamp=1_800_000_000)
    assert verify(b"k", b"{}", header, now=1_800_000_010)
    assert not verify(b"k", b"{ }", header, now=1_800_000_010)
    assert not verify(b"other", b"{}", header, now=1_800_000_010)
    assert not verify(b"k", b"{}", header, now=1_800_001_000)  # too old: a replay
    forged = header.replace("t=1800000000", "t=1800000900")
    assert not verify(b"k", b"{}", forged, now=1_800_000_900)
