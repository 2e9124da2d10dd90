"""The OperationOutcome that answers a FHIR error: one shape for every refusal.

Every text here goes to a caller, so it names elements, parameters and rules, never a
value: values are patient data.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.fhir.errors import ISSUE_CODES

# FhirError is defined in errors.py; imported here too for the old import path.
from gateway.fhir.errors import FhirError as FhirError

FHIR_JSON = "application/fhir+json"


def operation_outcome(status: int, reason: str, expression: str | None = None,
                      code: str | None = None, severity: str = "error",
                      details: list[dict[str, str]] | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity,
                             "code": code or ISSUE_CODES.get(status, "processing")}
    if details:
        issue["details"] = {"coding": details}
    issue["diagnostics"] = reason
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def outcome_bytes(error: FhirError) -> bytes:
    return orjson.dumps(operation_outcome(error.status, error.reason, error.expression,
                                          error.code, details=error.details))


def information(reason: str) -> dict[str, Any]:
    """An all-is-well OperationOutcome (Prefer: return=OperationOutcome)."""
    return operation_outcome(200, reason, code="informational", severity="information")
