"""What the agent API tells other systems: an SIU^S12/S13/S15 for a booking, a reschedule
or a cancellation, an OMP^O09 (ORC-1 RF) for a refill request, made from the outbound
tables (mappings/outbound.csv) and sent where the routes send that message type.

The message is committed to the inbox as a gateway-originated row in status `routed`
(for remote backends only, never applied to the local store) with one outbox row per
backend, so it is delivered by the same workers, in order per patient, with the same
retries, dead letters and `isthmus outbox` tooling as any routed message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.fhir import jsonio
from gateway.forward.backend import OutboxGate
from gateway.forward.routes import Router
from gateway.hl7.message import parse_message
from gateway.ingest.replay import patient_key
from gateway.mapping.to_v2 import Reverser
from gateway.store.inbox import ROUTED, InboundMessage, Inbox

log = logging.getLogger(__name__)

Json = dict[str, Any]
PEER = "agent-api"


@dataclass
class Outbound:
    """Builds and queues the messages; `send` answers the message type, or None when the
    routes send that type nowhere (a local-only gateway tells no one)."""

    reverser: Reverser
    inbox: Inbox
    router: Router
    gate: OutboxGate | None

    async def send(self, resources: list[Json], message_type: str) -> str | None:
        targets = self.router.for_message(message_type, self.reverser.application,
                                          self.reverser.facility)
        if not targets.remote:
            return None
        entries = [{"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r}
                   for r in resources]
        event = message_type.partition("^")[2]
        text = self.reverser.to_v2({"resourceType": "Bundle", "type": "collection",
                                    "entry": entries}, event=event)[0]
        raw = text.encode("utf-8")
        message = parse_message(raw)
        header = message.header
        inbound = InboundMessage(
            sending_application=header.sending_application,
            sending_facility=header.sending_facility,
            control_id=header.control_id, message_type=message_type, version="2.5.1",
            peer=PEER, raw=raw, ack=b"", received_at=datetime.now(UTC), status=ROUTED,
            routes=targets.remote, patient_key=patient_key(message),
            bundle=jsonio.dumps(_transaction(resources[:1])) if targets.needs_bundle
            else None)
        await self.inbox.submit(inbound)
        if self.gate is not None:
            self.gate.queued(targets.remote)
        return message_type


def _transaction(resources: list[Json]) -> Json:
    """The written resource as a FHIR backend takes it (PUT at its id: a redelivery
    changes nothing)."""
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in resources]}
