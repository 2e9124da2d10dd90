"""Settings of the operator console at /console: who may sign in, with which roles."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gateway.config.base import Section as _Section

Role = Literal["operator", "reviewer", "admin"]


class ConsoleUser(_Section):
    """A console user: a name, a salted scrypt hash (`isthmus console password NAME`
    prints one) and roles. operator: dashboard, messages, deliveries, mappings; reviewer:
    the audit pages; admin: both. `phi` lets the user open a message's content."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    password_hash: str = Field(pattern=r"^scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$")
    roles: tuple[Role, ...] = Field(min_length=1)
    phi: bool = False


class ConsoleConfig(_Section):
    enabled: bool = True  # served only when at least one user is configured
    users: tuple[ConsoleUser, ...] = ()
    # Minutes without a request before a session ends; sessions also end at sign-out.
    idle_timeout_minutes: float = Field(default=15.0, gt=0, le=24 * 60)
    # Cookies marked Secure (sent over HTTPS only; browsers also send them to localhost).
    secure_cookies: bool = True

    @field_validator("users")
    @classmethod
    def _unique(cls, users: tuple[ConsoleUser, ...]) -> tuple[ConsoleUser, ...]:
        names = [u.name for u in users]
        if len(set(names)) != len(names):
            raise ValueError("console user names must be unique")
        return users
