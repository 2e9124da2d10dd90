"""What the edge raises: one root, `EdgeError`; each refusal is answered in one place (an
OperationOutcome by `fhir_errors.outcomes`, an OAuth error JSON by the token endpoint)."""

from __future__ import annotations

from aiohttp import web

from gateway.fhir.errors import FhirError
from gateway.forward.errors import BackendUnavailable


class EdgeError(Exception):
    """The root of everything the edge raises."""


class AuthError(EdgeError):
    """A request to a protected route without acceptable credentials (401) or scope (403)."""

    def __init__(self, status: int, reason: str, www_authenticate: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.www_authenticate = www_authenticate

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": self.www_authenticate}


class OAuthError(EdgeError):
    """A token request refused: RFC 6749 §5.2 error code, description and HTTP status
    (with Retry-After, in seconds, when trying again later can succeed)."""

    def __init__(self, error: str, description: str, status: int = 400,
                 retry_after: int | None = None) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status
        self.retry_after = retry_after


class AuthSetupError(EdgeError, ValueError):
    """The auth configuration cannot be used; names the setting."""


class Passthrough(EdgeError):
    """An answer already made (a backend's own refusal, passed on as it came)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


class BackendFailed(EdgeError):
    """A remote backend could not be asked or did not answer in time, named for the
    caller (the backend's name is ours, never a value)."""

    def __init__(self, backend: str, error: BackendUnavailable) -> None:
        super().__init__(backend)
        self.backend = backend
        self.error = error


class BackendRefused(FhirError):
    """A refusal that a remote backend caused (its error status without an
    OperationOutcome, an answer that is not FHIR or not valid R4), answered as ours."""
