"""The API for voice and chat agents at /agent/v1 (an edge surface): verify the caller,
then appointments, slots, booking and refills as flat objects, minimum necessary,
audited.

    http.py      the routes: agent clients, rate limits, sessions, Idempotency-Key, audit
    service.py   one method per call, confined to the session's patient and purpose
    records.py   where data lives: the local FHIR store, or the EHR behind the facade
    outbound.py  SIU and OMP messages sent on through the routes (local shape)
    matching.py  caller verification rules (the table mappings/agent/matching.csv)
    sessions.py  sessions, failed attempts, idempotent answers (in memory, short-lived)
    flatten.py   FHIR resources as flat objects
    requests.py  request bodies and parameters, checked
    errors.py    every refusal, as {error, message}
    openapi.py   the OpenAPI document
"""

from gateway.agent.http import AGENT, AgentApi, routes
from gateway.agent.service import AgentService, Limits

__all__ = ["AGENT", "AgentApi", "AgentService", "Limits", "routes"]
