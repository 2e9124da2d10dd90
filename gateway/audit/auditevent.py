"""A sealed record as a FHIR R4 AuditEvent, shaped after the IHE Basic Audit Log Patterns.

REST accesses follow BALP's Read, Query, Create, Update and Delete profiles, and their
Patient variants when the record names a patient (the patient as an entity with type
Person and role Patient); the profile is claimed only for successful accesses, as BALP
defines them. Accesses BALP has no profile for keep the same shape with DICOM event
types: an MLLP ingest is an Import, an audit export an Export.

Rendering is a pure function of the sealed body (and, for decrypted exports, the revealed
PHI), so a verifier re-renders each exported AuditEvent and compares: an edited field shows
even where the chain data is intact. Each AuditEvent carries its chain data in one
extension: sequence number, chain hash, the sealed body and, when decrypted, the PHI
plaintext the body's digest commits to.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from gateway.audit.patient import fhir_reference
from gateway.audit.record import SUCCESS
from gateway.audit.sealed import Revealed

CHAIN_EXTENSION = "https://isthmus.dev/fhir/StructureDefinition/audit-chain"
PSEUDONYM_SYSTEM = "urn:isthmus:audit:patient-pseudonym"
CLIENT_SYSTEM = "urn:isthmus:audit:client"
ACTION_SYSTEM = "https://isthmus.dev/fhir/CodeSystem/audit-action"

_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
_REST = "http://hl7.org/fhir/restful-interaction"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_BALP_ENTITY = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
_BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
_PURPOSE = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_V2_MESSAGE_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0076"
_V2_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0003"

_SOURCE_ROLE = {"system": _DCM, "code": "110153", "display": "Source Role ID"}
_DESTINATION_ROLE = {"system": _DCM, "code": "110152", "display": "Destination Role ID"}
_FHIR_TYPE = re.compile(r"[A-Z][A-Za-z]+")
_IP_LIKE = re.compile(r"^[0-9\[]|^[0-9a-fA-F:]+$")


class _Kind:
    """How one action appears: event type, subtype, action code, BALP profile name and
    whether the caller is where the data came from (source) or went to (destination)."""

    def __init__(self, event_type: dict[str, str], subtype: dict[str, str] | None,
                 code: str, balp: str | None, caller_is_source: bool) -> None:
        self.event_type = event_type
        self.subtype = subtype
        self.code = code
        self.balp = balp
        self.caller_is_source = caller_is_source


def _own(code: str) -> dict[str, str]:
    return {"system": ACTION_SYSTEM, "code": code}


_REST_TYPE = {"system": _EVENT_TYPE, "code": "rest", "display": "Restful Operation"}
# BALP: for a read the client receives (Destination); for query, create, update and
# delete the parameters or content flow from the client (Source), and so by convention here.
_KINDS: dict[str, _Kind] = {
    "ingest": _Kind({"system": _DCM, "code": "110107", "display": "Import"},
                    _own("ingest"), "C", None, True),
    "translate": _Kind({"system": _DCM, "code": "110100", "display": "Application Activity"},
                       _own("translate"), "E", None, True),
    "read": _Kind(_REST_TYPE, {"system": _REST, "code": "read"}, "R", "Read", False),
    "search": _Kind(_REST_TYPE, {"system": _REST, "code": "search-type"}, "E", "Query", True),
    "create": _Kind(_REST_TYPE, {"system": _REST, "code": "create"}, "C", "Create", True),
    "update": _Kind(_REST_TYPE, {"system": _REST, "code": "update"}, "U", "Update", True),
    "delete": _Kind(_REST_TYPE, {"system": _REST, "code": "delete"}, "D", "Delete", True),
    "deliver": _Kind({"system": _DCM, "code": "110106", "display": "Export"},
                     _own("deliver"), "R", None, False),
    "token": _Kind({"system": _DCM, "code": "110114", "display": "User Authentication"},
                   _own("token"), "E", None, True),
    # A backend's webhook: the gateway is told of a change and imports the resource.
    "notify": _Kind({"system": _DCM, "code": "110107", "display": "Import"},
                    _own("notify"), "C", None, True),
    "export": _Kind({"system": _DCM, "code": "110106", "display": "Export"},
                    _own("export"), "R", None, False),
}
_PATIENT_RECORD = {"system": _DCM, "code": "110110", "display": "Patient Record"}


def outcome_code(outcome: str) -> str:
    """AuditEvent.outcome: 0 success, 4 minor failure (refused, denied), 8 serious failure."""
    if outcome == SUCCESS:
        return "0"
    if outcome[:1] == "4" or outcome.startswith(("AE", "CE", "denied")):
        return "4"
    return "8"


def render(seq: int, body: dict[str, Any], body_bytes: bytes, chain_hash: bytes,
           revealed: Revealed | None = None) -> dict[str, Any]:
    """The AuditEvent for one sealed record (PHI shown only when `revealed` is given)."""
    action = str(body.get("action", ""))
    kind = _KINDS.get(action) or _Kind(_REST_TYPE, _own(action), "E", None, True)
    resource_type = str(body.get("type", ""))
    fhir_resource = bool(_FHIR_TYPE.fullmatch(resource_type))
    event_type = kind.event_type
    if kind.event_type is _REST_TYPE and not fhir_resource:
        event_type = _PATIENT_RECORD  # a stored message, not a REST resource
    subtypes = [kind.subtype] if kind.subtype else []
    if action == "ingest" and resource_type:
        subtypes.extend(_v2_codings(resource_type))
    outcome = str(body.get("outcome", ""))
    event: dict[str, Any] = {"resourceType": "AuditEvent", "id": str(seq)}
    has_patient = "patient_index" in body
    if kind.balp and outcome == SUCCESS and fhir_resource:
        event["meta"] = {"profile": [_BALP + ("Patient" if has_patient else "") + kind.balp]}
    event["extension"] = [_chain_extension(seq, chain_hash, body_bytes, revealed)]
    event["type"] = event_type
    event["subtype"] = subtypes
    event["action"] = kind.code
    event["recorded"] = body.get("time")
    event["outcome"] = outcome_code(outcome)
    if outcome != SUCCESS:
        event["outcomeDesc"] = outcome
    purpose = body.get("purpose")
    if purpose:
        event["purposeOfEvent"] = [_purpose(purpose)]
    event["agent"] = _agents(body, kind)
    server = str(body.get("server", "isthmus"))
    event["source"] = {"site": server, "observer": {"display": server},
                       "type": [{"system": _SOURCE_TYPE, "code": "4",
                                 "display": "Application Server"}]}
    entities = _entities(body, revealed, action, resource_type, fhir_resource)
    if entities:
        event["entity"] = entities
    return event


def _chain_extension(seq: int, chain_hash: bytes, body_bytes: bytes,
                     revealed: Revealed | None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [
        {"url": "seq", "valueString": str(seq)},
        {"url": "hash", "valueString": chain_hash.hex()},
        {"url": "body", "valueBase64Binary": base64.b64encode(body_bytes).decode()},
    ]
    if revealed is not None:
        parts.append({"url": "phi",
                      "valueBase64Binary": base64.b64encode(revealed.plaintext).decode()})
    return {"url": CHAIN_EXTENSION, "extension": parts}


def _v2_codings(message_type: str) -> list[dict[str, str]]:
    parts = message_type.split("^")
    codings = [{"system": _V2_MESSAGE_TYPE, "code": parts[0]}] if parts[0] else []
    if len(parts) > 1 and parts[1]:
        codings.append({"system": _V2_EVENT_TYPE, "code": parts[1]})
    return codings


def _purpose(code: str) -> dict[str, Any]:
    return {"coding": [{"system": _PURPOSE, "code": code}]}


def _network(address: str) -> dict[str, str]:
    # AuditEventAgentNetworkType: 1 machine name, 2 IP address.
    return {"address": address, "type": "2" if _IP_LIKE.search(address) else "1"}


def _agents(body: dict[str, Any], kind: _Kind) -> list[dict[str, Any]]:
    caller_role, server_role = ((_SOURCE_ROLE, _DESTINATION_ROLE) if kind.caller_is_source
                                else (_DESTINATION_ROLE, _SOURCE_ROLE))
    client = str(body.get("client", ""))
    caller: dict[str, Any] = {"type": {"coding": [caller_role]}}
    caller["who"] = ({"identifier": {"system": CLIENT_SYSTEM, "value": client}} if client
                     else {"display": "unidentified caller"})
    if body.get("tls_subject"):
        caller["altId"] = body["tls_subject"]
    app, facility = body.get("app"), body.get("facility")
    if app or facility:
        caller["name"] = f"{app or ''} ({facility or ''})"
    caller["requestor"] = True
    if body.get("profile"):
        caller["policy"] = [f"urn:isthmus:task-profile:{body['profile']}"]
    if body.get("peer"):
        caller["network"] = _network(str(body["peer"]))
    if body.get("purpose") and not body.get("user"):
        caller["purposeOfUse"] = [_purpose(body["purpose"])]
    agents = [caller]
    server = str(body.get("server", "isthmus"))
    agents.append({"type": {"coding": [server_role]}, "who": {"display": server},
                   "requestor": False, "network": _network(server.rpartition("@")[2])})
    if body.get("user"):
        user: dict[str, Any] = {
            "type": {"coding": [{"system": _PARTICIPATION, "code": "IRCP",
                                 "display": "information recipient"}]},
            "who": {"identifier": {"value": body["user"]}}, "requestor": True}
        if body.get("purpose"):
            user["purposeOfUse"] = [_purpose(body["purpose"])]
        agents.append(user)
    return agents


def _entities(body: dict[str, Any], revealed: Revealed | None, action: str,
              resource_type: str, fhir_resource: bool) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    if "patient_index" in body:
        patient = (fhir_reference(revealed.patient) if revealed and revealed.patient else
                   {"type": "Patient", "identifier": {"system": PSEUDONYM_SYSTEM,
                                                      "value": body["patient_index"]}})
        entities.append({"what": patient,
                         "type": {"system": _ENTITY_TYPE, "code": "1", "display": "Person"},
                         "role": {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"}})
    if action in ("search", "export"):
        query = revealed.query if revealed and revealed.query else str(body.get("query", ""))
        entity: dict[str, Any] = {
            "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": _OBJECT_ROLE, "code": "24", "display": "Query"},
            "query": base64.b64encode(query.encode()).decode()}
        if body.get("query"):
            entity["description"] = body["query"]
        entities.append(entity)
    elif resource_type and action != "ingest":
        resource_id = revealed.resource_id if revealed else None
        if resource_id and fhir_resource:
            what: dict[str, Any] = {"reference": f"{resource_type}/{resource_id}"}
        elif resource_id:
            what = {"identifier": {"value": resource_id}, "display": resource_type}
        else:
            what = {"display": resource_type}
        entities.append({"what": what,
                         "type": {"system": _ENTITY_TYPE, "code": "2",
                                  "display": "System Object"},
                         "role": {"system": _OBJECT_ROLE, "code": "4",
                                  "display": "Domain Resource"}})
    control_id = body.get("control_id")
    if control_id or body.get("detail"):
        transaction: dict[str, Any] = {
            "type": {"system": _BALP_ENTITY, "code": "XrequestId"}}
        if control_id:
            transaction["what"] = {"identifier": {"value": control_id}}
        if body.get("detail"):
            transaction["detail"] = [{"type": "note", "valueString": body["detail"]}]
        entities.append(transaction)
    if body.get("trace"):
        entities.append({"what": {"identifier": {"system": "urn:isthmus:trace-id",
                                                 "value": body["trace"]}},
                         "type": {"system": ACTION_SYSTEM, "code": "trace"}})
    return entities
