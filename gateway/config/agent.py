"""Settings of the API for voice and chat agents (`[agent]`, served at /agent/v1)."""

from __future__ import annotations

from pydantic import Field

from gateway.config.base import Section as _Section


class AgentConfig(_Section):
    """Caller verification, sessions, deadlines and limits of the agent API."""

    enabled: bool = True
    # Failed verifications allowed per call_id and per caller_phone within `window`
    # seconds; the next one is answered 423 locked until the oldest failure leaves it.
    attempts: int = Field(default=3, ge=1, le=20)
    window: float = Field(default=900.0, gt=0, le=86_400)
    # A session's lifetime in seconds (15 min), from verification.
    session_ttl: float = Field(default=900.0, gt=0, le=86_400)
    # Longest an agent waits for the EHR (or the store) in one call before 503
    # emr_unavailable: the caller is on the line.
    deadline: float = Field(default=2.0, gt=0, le=60)
    # Every verification answer takes at least this long, success or not, so the time
    # says nothing about which factor was wrong.
    verify_floor: float = Field(default=0.25, ge=0, le=5)
    # Requests per agent client: "600/minute"; "" is unlimited.
    rate_limit: str = Field(default="600/minute",
                            pattern=r"^(|\d+(\.\d+)?/(second|minute|hour|day))$")
    # How far ahead "upcoming" appointments and free slots are looked for, in days.
    horizon_days: int = Field(default=90, ge=1, le=730)
    # How long an Idempotency-Key's first answer is kept for its retries, in seconds.
    idempotency_ttl: float = Field(default=86_400.0, gt=0, le=604_800)
    # MSH-3 and MSH-4 of the SIU and OMP messages the agent API sends through the routes.
    sender_application: str = Field(default="ISTHMUS", min_length=1, max_length=64)
    sender_facility: str = Field(default="GATEWAY", min_length=1, max_length=64)
