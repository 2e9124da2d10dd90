"""FHIR errors and the OperationOutcome that answers them: one shape for every refusal.

Every text here goes to a caller, so it names elements, parameters and rules, never a
value: values are patient data.
"""

from __future__ import annotations

from typing import Any

import orjson

FHIR_JSON = "application/fhir+json"

# HTTP status -> the OperationOutcome issue code (FHIR R4 valueset issue-type).
_ISSUE_CODE = {
    400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
    406: "not-supported", 409: "conflict", 410: "deleted", 412: "conflict",
    413: "too-costly", 415: "not-supported", 422: "processing", 429: "throttled",
    500: "exception", 501: "not-supported", 503: "transient",
}


class FhirError(Exception):
    """A request the FHIR edge refuses: the HTTP status, a reason without PHI, and the
    element or parameter it concerns (FHIRPath-like, e.g. 'Patient.birthDate')."""

    def __init__(self, status: int, reason: str, expression: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.expression = expression
        self.code = code or _ISSUE_CODE.get(status, "processing")
        self.headers = headers or {}


def operation_outcome(status: int, reason: str, expression: str | None = None,
                      code: str | None = None, severity: str = "error") -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity,
                             "code": code or _ISSUE_CODE.get(status, "processing"),
                             "diagnostics": reason}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def outcome_bytes(error: FhirError) -> bytes:
    return orjson.dumps(operation_outcome(error.status, error.reason, error.expression,
                                          error.code))


def information(reason: str) -> dict[str, Any]:
    """An all-is-well OperationOutcome (Prefer: return=OperationOutcome)."""
    return operation_outcome(200, reason, code="informational", severity="information")
