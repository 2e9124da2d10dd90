"""Policy: SMART scopes, minimum-necessary profiles and PHI redaction; who may see what."""

from gateway.policy.errors import PolicyError
from gateway.policy.jose import (
    KeySet,
    TokenError,
    load_jwks,
    public_key_from_pem,
    sign_jwt,
    verify_jwt,
)
from gateway.policy.principal import Principal, Via, patient_reference
from gateway.policy.profiles import Profile, ProfileDenied, ProfileError, load_profiles
from gateway.policy.redact import (
    PhiRedactingFilter,
    install,
    redact_query,
    redact_text,
    safe_text,
)
from gateway.policy.scopes import (
    Scope,
    ScopeDenied,
    ScopeError,
    ScopeSet,
    grant,
    parse_scope,
)

__all__ = [
    "KeySet",
    "PolicyError",
    "Principal",
    "Scope",
    "ScopeDenied",
    "ScopeError",
    "ScopeSet",
    "TokenError",
    "Via",
    "grant",
    "load_jwks",
    "parse_scope",
    "patient_reference",
    "public_key_from_pem",
    "sign_jwt",
    "verify_jwt",
]

__all__ += [
    "PhiRedactingFilter",
    "Profile",
    "ProfileDenied",
    "ProfileError",
    "install",
    "load_profiles",
    "redact_query",
    "redact_text",
    "safe_text",
]
