"""Errors of the policy layer: one root, `PolicyError`, under every one of them.

Reasons name a scope, a profile, a resource type or a rule; never token content or a
value. Classes that were born as ValueError or LookupError keep that base too.
"""

from __future__ import annotations


class PolicyError(Exception):
    """The root of every error `gateway.policy` raises."""


class TokenError(PolicyError):
    """A token, or a key set, was refused; `reason` is short and never echoes token content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ScopeError(PolicyError, ValueError):
    """A resource scope that does not follow the SMART grammar; says which part and why."""


class ScopeDenied(PolicyError):
    """No granted scope permits this interaction on this resource type."""

    def __init__(self, interaction: str, resource_type: str) -> None:
        super().__init__(f"no granted scope permits {interaction} on {resource_type}")
        self.interaction = interaction
        self.resource_type = resource_type


class ProfileError(PolicyError, ValueError):
    """A profile in the config that names an unknown resource type or element."""

    def __init__(self, profile: str, resource_type: str, element: str | None,
                 reason: str) -> None:
        where = f"{resource_type}.{element}" if element else resource_type
        super().__init__(f"profiles.{profile}: {where}: {reason}")
        self.profile = profile
        self.resource_type = resource_type
        self.element = element
        self.reason = reason


class ProfileDenied(PolicyError, LookupError):
    """A resource type the profile does not list was about to be served."""

    def __init__(self, profile: str, resource_type: str) -> None:
        super().__init__(f"profile '{profile}' does not allow {resource_type}")
        self.profile = profile
        self.resource_type = resource_type


class CursorRefused(PolicyError):
    """A paging cursor that cannot be used: forged, another client's, or expired. The
    reason says which of these kinds, never the cursor's content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
