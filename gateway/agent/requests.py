"""The agent API's request bodies and query parameters, checked: a missing or malformed
field is an InvalidRequest naming the field, never echoing its value."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.agent.errors import InvalidRequest
from gateway.agent.matching import SECOND_FACTORS
from gateway.agent.sessions import PURPOSES

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_CALL_ID = re.compile(r"[\x21-\x7e]{1,128}")
_MAX_TEXT = 500


@dataclass(frozen=True, slots=True)
class Verification:
    purpose: str
    call_id: str
    caller_phone: str | None  # E.164 once checked
    last_name: str
    first_name: str | None
    date_of_birth: str
    second: tuple[str, str]  # (factor, value as said)


def verification(body: Any, phone: Any) -> Verification:
    """The session request; `phone` normalises caller_phone to E.164 (None: not one)."""
    data = _object(body)
    purpose = _text(data, "purpose")
    if purpose not in PURPOSES:
        raise InvalidRequest("purpose must be one of: " + ", ".join(PURPOSES))
    call_id = _text(data, "call_id")
    if not _CALL_ID.fullmatch(call_id):
        raise InvalidRequest("call_id must be 1 to 128 printable characters")
    caller_phone = _optional(data, "caller_phone")
    normalised = phone(caller_phone) if caller_phone is not None else None
    if caller_phone is not None and normalised is None:
        raise InvalidRequest("caller_phone must be a phone number (E.164: +1...)")
    given = [f for f in SECOND_FACTORS if data.get(f) not in (None, "")]
    if len(given) != 1:
        raise InvalidRequest("give exactly one of: " + ", ".join(SECOND_FACTORS))
    return Verification(purpose, call_id, normalised, _text(data, "last_name"),
                        _optional(data, "first_name"), _text(data, "date_of_birth"),
                        (given[0], _text(data, given[0])))


def slot_id(body: Any) -> str:
    return identifier(_text(_object(body), "slot_id"), "slot_id")


def medication_id(body: Any) -> str:
    return identifier(_text(_object(body), "medication_id"), "medication_id")


def note(body: Any, name: str) -> str | None:
    return _optional(_object(body), name)


def identifier(value: str, name: str) -> str:
    if not _ID.fullmatch(value):
        raise InvalidRequest(f"{name} is not a valid id")
    return value


def moment(value: str | None, name: str) -> str | None:
    """An ISO 8601 date or date-time query parameter."""
    if value is None:
        return None
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO 8601 date or date-time") from None
    return value


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{name} is required (a non-empty string)")
    if len(value) > _MAX_TEXT:
        raise InvalidRequest(f"{name} is too long")
    return value.strip()


def _optional(data: dict[str, Any], name: str) -> str | None:
    if data.get(name) in (None, ""):
        return None
    return _text(data, name)
