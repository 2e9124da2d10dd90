"""The OpenAPI 3.1 document of /agent/v1, served at /agent/v1/openapi.json."""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Json) -> Json:
    return {"content": {"application/json": {"schema": schema}}}


def _error(description: str, *codes: str) -> Json:
    return {"description": description + " (error: " + ", ".join(codes) + ")",
            **_json(_ref("Error"))}


_STRING = {"type": "string"}
_NULLABLE = {"type": ["string", "null"]}
_SESSION: list[Json] = [{"apiKey": [], "session": []}, {"bearer": [], "session": []}]
_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
                "schema": {"type": "string", "maxLength": 255},
                "description": "A retry with the same key returns the first answer and "
                               "changes nothing."}
_COMMON: Json = {
    "401": _error("no or unknown credentials or session", "unauthorized", "invalid_session"),
    "403": _error("not an agent client, or not for this session's purpose", "forbidden",
                  "not_permitted_for_purpose"),
    "429": _error("too many requests from this agent client", "rate_limited"),
    "503": _error("the EHR did not answer within the deadline, or the audit trail could "
                  "not record the call", "emr_unavailable", "audit_unavailable"),
}


def _query(*names: str) -> list[Json]:
    return [{"name": n, "in": "query", "required": False, "schema": _STRING} for n in names]


_FLAT_APPOINTMENT = {"type": "object", "properties": {
    k: _NULLABLE for k in ("id", "start", "end", "status", "type", "provider_name",
                           "location", "reason")}}
_FLAT_SLOT = {"type": "object", "properties": {
    k: _NULLABLE for k in ("id", "start", "end", "provider_name", "location", "type")}}
_FLAT_MEDICATION = {"type": "object", "properties": {
    **{k: _NULLABLE for k in ("id", "name", "dose", "frequency", "last_filled",
                              "prescriber_name")},
    "refills_remaining": {"type": ["integer", "null"]}}}

DOCUMENT: Json = {
    "openapi": "3.1.0",
    "info": {"title": "Isthmus agent API", "version": "1",
             "description": "For voice and chat agents: verify the caller first, then "
                            "appointments, slots, booking and refills as flat objects, "
                            "minimum necessary, audited. See docs/agent-api.md."},
    "servers": [{"url": "/agent/v1"}],
    "components": {
        "securitySchemes": {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "an access token of a SMART backend services client"},
            "session": {"type": "apiKey", "in": "header", "name": "X-Session-Token"},
        },
        "schemas": {
            "Error": {"type": "object", "required": ["error", "message"], "properties": {
                "error": _STRING, "message": _STRING,
                "attempts_left": {"type": "integer"}, "retry_after": {"type": "integer"}}},
            "SessionRequest": {
                "type": "object", "required": ["purpose", "call_id", "last_name",
                                               "date_of_birth"],
                "properties": {
                    "purpose": {"enum": ["scheduling", "appointment_lookup", "refill"]},
                    "call_id": _STRING, "caller_phone": _STRING, "last_name": _STRING,
                    "first_name": _STRING, "date_of_birth": _STRING, "phone": _STRING,
                    "mrn": _STRING, "ssn_last4": _STRING, "zip": _STRING},
                "description": "exactly one of phone, mrn, ssn_last4, zip"},
            "Session": {"type": "object", "properties": {
                "session_token": _STRING, "session_id": _STRING,
                "expires_in": {"type": "integer"},
                "patient": {"type": "object", "properties": {
                    "first_name": _NULLABLE, "last_name_initial": _NULLABLE}}}},
            "Appointment": _FLAT_APPOINTMENT,
            "Slot": _FLAT_SLOT,
            "Medication": _FLAT_MEDICATION,
        },
    },
    "paths": {
        "/sessions": {"post": {
            "summary": "verify the caller and open a session",
            "security": [{"apiKey": []}, {"bearer": []}],
            "parameters": [_IDEMPOTENCY],
            "requestBody": {"required": True, **_json(_ref("SessionRequest"))},
            "responses": {
                "201": {"description": "verified", **_json(_ref("Session"))},
                "400": _error("malformed request", "invalid_request"),
                "401": _error("not verified (the same answer whatever was wrong)",
                              "not_verified", "unauthorized"),
                "423": _error("too many failures for this call or phone", "locked"),
                **{k: v for k, v in _COMMON.items() if k != "401"}}}},
        "/sessions/{id}": {"delete": {
            "summary": "end the session and purge what was cached for it",
            "security": _SESSION,
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": _STRING}],
            "responses": {"200": {"description": "ended"}, **_COMMON}}},
        "/appointments": {
            "get": {"summary": "the patient's appointments", "security": _SESSION,
                    "parameters": _query("from", "to", "status"),
                    "responses": {"200": {"description": "appointments", **_json(
                        {"type": "array", "items": _ref("Appointment")})}, **_COMMON}},
            "post": {"summary": "book a free slot", "security": _SESSION,
                     "parameters": [_IDEMPOTENCY],
                     "requestBody": {"required": True, **_json({
                         "type": "object", "required": ["slot_id"],
                         "properties": {"slot_id": _STRING, "reason": _STRING}})},
                     "responses": {"201": {"description": "booked",
                                           **_json(_ref("Appointment"))},
                                   "404": _error("no such slot", "not_found"),
                                   "409": _error("the slot was taken", "slot_unavailable"),
                                   **_COMMON}}},
        "/appointments/{id}/cancel": {"post": {
            "summary": "cancel one of the patient's appointments", "security": _SESSION,
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": _STRING},
                           _IDEMPOTENCY],
            "requestBody": {"required": False, **_json(
                {"type": "object", "properties": {"reason": _STRING}})},
            "responses": {"200": {"description": "cancelled", **_json(_ref("Appointment"))},
                          "404": _error("not this patient's", "not_found"), **_COMMON}}},
        "/appointments/{id}/reschedule": {"post": {
            "summary": "move one of the patient's appointments to a free slot",
            "security": _SESSION,
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": _STRING},
                           _IDEMPOTENCY],
            "requestBody": {"required": True, **_json(
                {"type": "object", "required": ["slot_id"],
                 "properties": {"slot_id": _STRING}})},
            "responses": {"200": {"description": "moved", **_json(_ref("Appointment"))},
                          "404": _error("not this patient's", "not_found"),
                          "409": _error("the slot was taken", "slot_unavailable"),
                          **_COMMON}}},
        "/slots": {"get": {
            "summary": "free slots", "security": _SESSION,
            "parameters": _query("from", "to", "provider", "type", "location"),
            "responses": {"200": {"description": "free slots", **_json(
                {"type": "array", "items": _ref("Slot")})}, **_COMMON}}},
        "/medications": {"get": {
            "summary": "the patient's active medications", "security": _SESSION,
            "parameters": _query("status"),
            "responses": {"200": {"description": "medications", **_json(
                {"type": "array", "items": _ref("Medication")})}, **_COMMON}}},
        "/refill-requests": {"post": {
            "summary": "ask for a refill of an active prescription", "security": _SESSION,
            "parameters": [_IDEMPOTENCY],
            "requestBody": {"required": True, **_json(
                {"type": "object", "required": ["medication_id"],
                 "properties": {"medication_id": _STRING, "note": _STRING}})},
            "responses": {"201": {"description": "requested", **_json(
                {"type": "object", "properties": {"id": _STRING,
                                                  "status": {"const": "requested"}}})},
                          "404": _error("not this patient's", "not_found"),
                          "422": _error("refused", "no_refills_remaining", "not_active"),
                          **_COMMON}}},
    },
}
