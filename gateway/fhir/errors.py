"""Errors of the FHIR codec layer: one root, `FhirCodecError`, under every one of them.

Every text here may reach a caller, so it names elements, parameters, rules and limits,
never a value: values are patient data. The classes that were born elsewhere keep their
old bases too (`ValueError` for the search table and validation), so existing `except`
clauses still catch them.
"""

from __future__ import annotations

from pathlib import Path

# HTTP status -> the OperationOutcome issue code (FHIR R4 valueset issue-type).
ISSUE_CODES = {
    400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
    406: "not-supported", 409: "conflict", 410: "deleted", 412: "conflict",
    413: "too-costly", 415: "not-supported", 422: "processing", 429: "throttled",
    500: "exception", 501: "not-supported", 503: "transient",
}


class FhirCodecError(Exception):
    """The root of every error `gateway.fhir` raises."""


# -- the model ------------------------------------------------------------------------------


class UnknownElement(FhirCodecError, ValueError):
    """A path that the FHIR R4 model does not define."""


class InvalidResource(FhirCodecError, ValueError):
    """A resource the R4 model refuses; names the element path, never its value. `code`:
    the OperationOutcome issue type (structure; value or code-invalid for a value rule)."""

    def __init__(self, resource_type: str, path: str, reason: str, *,
                 code: str = "structure") -> None:
        super().__init__(f"{resource_type}.{path}: {reason}" if path else
                         f"{resource_type}: {reason}")
        self.resource_type = resource_type
        self.path = path
        self.reason = reason
        self.code = code


# -- refusals the FHIR edge answers with an OperationOutcome --------------------------------


class FhirError(FhirCodecError):
    """A request the FHIR edge refuses: the HTTP status, a reason without PHI, and the
    element or parameter it concerns (FHIRPath-like, e.g. 'Patient.birthDate')."""

    def __init__(self, status: int, reason: str, expression: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None,
                 details: list[dict[str, str]] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.expression = expression
        self.code = code or ISSUE_CODES.get(status, "processing")
        self.headers = headers or {}
        # Codings for the issue's `details` (a backend's own error codes: system and
        # code only, never its text).
        self.details = details or []


class BodyError(FhirError):
    """A request body the FHIR edge refuses, with a reason that quotes nothing from it."""

    def __init__(self, status: int, reason: str, expression: str | None = None) -> None:
        super().__init__(status, reason, expression)


class BodyTooLarge(BodyError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {max_bytes} bytes")


class BodyTooComplex(BodyError):
    """Nesting or an array beyond the configured limit (413: too costly to process)."""

    def __init__(self, reason: str) -> None:
        super().__init__(413, reason)


class BodyInvalid(BodyError):
    def __init__(self, reason: str, expression: str | None = None) -> None:
        super().__init__(400, reason, expression)


# -- search ---------------------------------------------------------------------------------


class SearchTableError(FhirCodecError, ValueError):
    """A row of the search parameter table that cannot be used: file, line and reason."""

    def __init__(self, file: Path | str, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}")
        self.file = str(file)
        self.line = line
        self.reason = reason


class SearchError(FhirCodecError, ValueError):
    """A search the gateway refuses (HTTP `status`): names the parameter and the rule, never
    the value."""

    status = 400

    def __init__(self, param: str, reason: str) -> None:
        # An empty `param`: the rule is about the whole search (how many parameters).
        super().__init__(f"{param}: {reason}" if param else reason)
        self.param = param
        self.reason = reason


class UnsupportedFormat(SearchError):
    """_format asks for something other than JSON: the edge answers 415."""

    status = 415
