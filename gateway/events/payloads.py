"""What a target receives for one change event (pure functions).

Webhooks: `ids` names the event and the resource; `flat` adds the agent API's flat object.
Subscriptions: no payload (ids only) names the Subscription, the event and the resource;
`application/fhir+json` is a history Bundle holding the version as the owner may read it
(cut by its task profile), or, for a deletion, the request alone.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from gateway.events.catalogue import event_name
from gateway.events.subscriptions import FHIR_PAYLOAD, SubscriptionSpec
from gateway.fhir import jsonio
from gateway.fhir.search import SearchRegistry
from gateway.store.events import ChangeEvent

JSON = "application/json"
_METHODS = {"created": ("POST", "201"), "updated": ("PUT", "200"), "deleted": ("DELETE", "204")}


def _resource_ids(event: ChangeEvent) -> dict[str, str]:
    return {"type": event.resource_type, "id": event.id, "versionId": str(event.version)}


def webhook_body(event: ChangeEvent, flat: dict[str, Any] | None = None,
                 with_flat: bool = False) -> bytes:
    document: dict[str, Any] = {
        "id": event.event_id, "event": event_name(event.resource_type, event.action),
        "occurredAt": event.at, "resource": _resource_ids(event)}
    if with_flat:
        document["data"] = flat
    return orjson.dumps(document)


def subscription_body(event: ChangeEvent, spec: SubscriptionSpec,
                      view: dict[str, Any] | None) -> tuple[bytes, str]:
    """(body, content type) of a Subscription's notification; `view` is the version as
    its owner may read it (None for a deletion)."""
    if spec.payload != FHIR_PAYLOAD:
        return orjson.dumps({
            "id": event.event_id, "subscription": f"Subscription/{spec.id}",
            "event": event_name(event.resource_type, event.action),
            "occurredAt": event.at, "resource": _resource_ids(event)}), JSON
    method, status = _METHODS[event.action]
    url = f"{event.resource_type}/{event.id}"
    entry: dict[str, Any] = {
        "fullUrl": f"urn:isthmus:{url}",
        "request": {"method": method, "url": url if method != "POST" else
                    event.resource_type},
        "response": {"status": status, "etag": f'W/"{event.version}"',
                     "lastModified": event.at}}
    if view is not None and event.action != "deleted":
        entry["resource"] = view
    bundle = {"resourceType": "Bundle", "type": "history", "timestamp": event.at,
              "meta": {"tag": [{"system": "urn:isthmus:event",
                                "code": event_name(event.resource_type, event.action)}]},
              "entry": [entry]}
    return jsonio.dumps(bundle), FHIR_PAYLOAD


def patient_of(registry: SearchRegistry, event: ChangeEvent,
               resource: dict[str, Any] | None) -> str:
    """The per-patient ordering key of an event: a hash of the patient it is about (the
    first, if several), '' when none. Not an identifier: the outbox keeps it (blinded)."""
    if event.resource_type == "Patient":
        patient = f"Patient/{event.id}"
    elif resource is None:
        return ""
    else:
        patients = registry.patients(event.resource_type, resource)
        if not patients:
            return ""
        patient = min(patients)
    return hashlib.sha256(patient.encode()).hexdigest()[:32]
