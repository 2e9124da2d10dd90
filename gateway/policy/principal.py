"""Who is asking: the authenticated client, its granted scopes, task profile and patient."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from gateway.policy.scopes import ScopeSet

Via = Literal["smart", "issuer", "api-key", "anonymous"]

# FHIR R4 §2.24.0.1 (id datatype): 1 to 64 of A-Z a-z 0-9 - .
_PATIENT_ID = re.compile(r"[A-Za-z0-9.-]{1,64}")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller; `token_id` is the token's jti (never the token, never PHI)."""

    client_id: str
    scopes: ScopeSet
    via: Via
    profile: str | None = None
    # 'Patient/123' when the credential carries a patient launch context.
    patient: str | None = None
    token_id: str = field(default="")


def patient_reference(value: object) -> str | None:
    """'Patient/<id>' from a SMART `patient` launch value ('123' or 'Patient/123'), else None."""
    if not isinstance(value, str):
        return None
    ident = value.removeprefix("Patient/")
    return f"Patient/{ident}" if _PATIENT_ID.fullmatch(ident) else None
