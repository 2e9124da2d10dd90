"""The agent API as a test drives it: API keys for an agent client and a FHIR writer,
the synthetic clinic fed over MLLP (real HL7 bytes) or seeded into a fake EHR, and a
small client that verifies a caller and calls /agent/v1 with the session token."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

AGENT_KEY = "agent-key-voicebot-1"
OTHER_AGENT_KEY = "agent-key-chatbot-2"
NOT_AGENT_KEY = "fhir-key-reader-3"
WRITER_KEY = "fhir-key-writer-4"
MESSAGES = Path(__file__).resolve().parents[1] / "messages" / "agent"
# Fed in this order: orders, dispenses, a booked appointment, then the registrations
# (each message's PID replaces the Patient: the ADT's carries the phone and address).
CLINIC = ("rde_o11_refills.hl7", "rde_o11_last_refill.hl7", "rde_o11_stopped.hl7",
          "rds_o13_first.hl7", "rds_o13_last.hl7", "siu_s12_booked.hl7",
          "adt_a04_patient.hl7", "adt_a04_other.hl7")
# The caller of the synthetic clinic, as an agent hears her.
CALLER = {"last_name": "agentcanary smith", "first_name": "ZOE",
          "date_of_birth": "02/14/1980", "phone": "(617) 555-0142"}
# Words from the synthetic records that must never leave in logs, spans or errors.
CANARIES = ("Agentcanary", "Othercanary", "1980-02-14", "19800214", "5550142", "MRN-7000",
            "123-45-6789", "Synthetic Way")


def api_key(name: str, key: str, scopes: list[str]) -> dict[str, Any]:
    return {"name": name, "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
            "scopes": scopes}


def agent_settings(**extra: Any) -> dict[str, Any]:
    """Overrides for a gateway serving the agent API (no verification floor, no limit)."""
    return {"auth.api_keys": [api_key("voicebot", AGENT_KEY, ["agent"]),
                              api_key("chatbot", OTHER_AGENT_KEY, ["agent"]),
                              api_key("reader", NOT_AGENT_KEY, ["system/*.rs"]),
                              api_key("writer", WRITER_KEY, ["system/*.cruds"])],
            "agent.verify_floor": 0.0, "agent.rate_limit": "", **extra}


def practitioner() -> dict[str, Any]:
    return {"resourceType": "Practitioner", "id": "prac-lee",
            "name": [{"family": "Lee", "given": ["Avery"], "prefix": ["Dr"]}]}


def location() -> dict[str, Any]:
    return {"resourceType": "Location", "id": "loc-north", "name": "North Clinic"}


def schedule() -> dict[str, Any]:
    return {"resourceType": "Schedule", "id": "sched-lee",
            "actor": [{"reference": "Practitioner/prac-lee"},
                      {"reference": "Location/loc-north"}]}


def slot(ident: str, start: str, end: str, status: str = "free") -> dict[str, Any]:
    return {"resourceType": "Slot", "id": ident, "schedule": {"reference": "Schedule/sched-lee"},
            "status": status, "start": start, "end": end,
            "appointmentType": {"text": "Follow-up visit"}}


SLOTS = (slot("slot-a", "2027-02-01T09:00:00+00:00", "2027-02-01T09:30:00+00:00"),
         slot("slot-b", "2027-02-01T10:00:00+00:00", "2027-02-01T10:30:00+00:00"),
         slot("slot-c", "2027-02-02T09:00:00+00:00", "2027-02-02T09:30:00+00:00"),
         slot("slot-busy", "2027-02-03T09:00:00+00:00", "2027-02-03T09:30:00+00:00",
              "busy"))


@dataclass
class Reply:
    status: int
    body: Any
    raw: bytes
    headers: Any = None


@dataclass
class AgentClient:
    """Calls /agent/v1 as one agent client; `token` once a caller is verified."""

    http: aiohttp.ClientSession
    base: str
    key: str = AGENT_KEY
    token: str | None = None
    session_id: str | None = None
    sent: list[Reply] = field(default_factory=list)

    async def call(self, method: str, path: str, body: Any = None, *,
                   idempotency_key: str | None = None, token: str | None = None,
                   key: str | None = None) -> Reply:
        headers = {"X-API-Key": key or self.key}
        session = token or self.token
        if session is not None:
            headers["X-Session-Token"] = session
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.http.request(method, self.base + "/agent/v1" + path, data=data,
                                     headers=headers) as response:
            raw = await response.read()
            reply = Reply(response.status, json.loads(raw) if raw else None, raw,
                          response.headers)
        self.sent.append(reply)
        return reply

    async def verify(self, purpose: str, call_id: str, **factors: Any) -> Reply:
        reply = await self.call("POST", "/sessions", {
            "purpose": purpose, "call_id": call_id, **(factors or CALLER)})
        if reply.status == 201:
            self.token = reply.body["session_token"]
            self.session_id = reply.body["session_id"]
        return reply
