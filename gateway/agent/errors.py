"""What the agent API refuses, each named for what went wrong: one status, one stable
`error` code and a `message` for people that never carries PHI (no names, dates, ids
of patients). `gateway.agent.http` turns every one into `{error, message, ...}` in one
place."""

from __future__ import annotations

import math
from typing import Any


class AgentError(Exception):
    """The root of the agent API's refusals."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}

    @property
    def headers(self) -> dict[str, str]:
        retry_after = self.extra.get("retry_after")
        return {"Retry-After": str(retry_after)} if isinstance(retry_after, int) else {}


class InvalidRequest(AgentError):
    """A body or parameter that is missing or malformed (named, never echoed)."""


class Unauthenticated(AgentError):
    status = 401
    code = "unauthorized"


class Forbidden(AgentError):
    status = 403
    code = "forbidden"


class InvalidSession(AgentError):
    """No session for this token: never issued, ended, or expired (purged either way)."""

    status = 401
    code = "invalid_session"

    def __init__(self) -> None:
        super().__init__("the session token is unknown or expired; verify the caller again")


class NotVerified(AgentError):
    """Same answer whether no patient matched or a factor was wrong (no enumeration)."""

    status = 401
    code = "not_verified"

    def __init__(self, attempts_left: int) -> None:
        super().__init__("the caller could not be verified", attempts_left=attempts_left)


class Locked(AgentError):
    status = 423
    code = "locked"

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many failed verifications for this call or phone; hand the "
                         "caller over to a person", retry_after=_seconds(retry_after))


class NotPermitted(AgentError):
    """The session's purpose does not cover this call (minimum necessary)."""

    status = 403
    code = "not_permitted_for_purpose"


class NotFound(AgentError):
    """Absent, or another patient's: the two are one answer."""

    status = 404
    code = "not_found"


class SlotUnavailable(AgentError):
    status = 409
    code = "slot_unavailable"

    def __init__(self) -> None:
        super().__init__("the slot is no longer free; offer another one")


class IdempotencyConflict(AgentError):
    status = 422
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__("this Idempotency-Key was used for a different request")


class RefillRefused(AgentError):
    status = 422

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RateLimited(AgentError):
    status = 429
    code = "rate_limited"

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many requests from this agent client",
                         retry_after=_seconds(retry_after))


class AuditUnavailable(AgentError):
    """The call's audit record could not be committed: not answered (fail closed)."""

    status = 503
    code = "audit_unavailable"

    def __init__(self) -> None:
        super().__init__("the call could not be recorded in the audit trail; try again",
                         retry_after=1)


class EmrUnavailable(AgentError):
    """The EHR (or the store) could not answer within the deadline: never a guess."""

    status = 503
    code = "emr_unavailable"

    def __init__(self, retry_after: float) -> None:
        super().__init__("the EHR is not answering; try again shortly or hand over",
                         retry_after=_seconds(retry_after))


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))
