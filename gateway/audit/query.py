"""A reviewer's question: which records, by time, patient, client and action.

The same filters serve `isthmus audit export` and `GET /audit/AuditEvent`. Times are ISO
8601; one without an offset is UTC; a date alone as the end of a range includes that whole
day. Error texts name the filter and the expected form, never the value given (it could
be anything a reviewer pasted, a patient identifier included).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from urllib.parse import quote

# QueryError: defined in errors.py; imported here too for the old import path.
from gateway.audit.errors import QueryError as QueryError
from gateway.audit.record import Action

_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIME_FORM = "use ISO 8601, e.g. 2026-11-26 or 2026-11-26T08:30:00Z"


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Records recorded in [start, end), and matching every other filter given."""

    start: datetime | None = None
    end: datetime | None = None
    patient: str | None = None
    client: str | None = None
    action: Action | None = None

    def text(self, *, with_patient: bool = True) -> str:
        """The query as a URL query string; with_patient=False leaves the patient out."""
        parts = []
        if self.start is not None:
            parts.append(f"from={_iso(self.start)}")
        if self.end is not None:
            parts.append(f"to={_iso(self.end)}")
        if self.patient is not None:
            parts.append("patient=" + (quote(self.patient, safe="") if with_patient else "*"))
        if self.client is not None:
            parts.append(f"client={quote(self.client, safe='')}")
        if self.action is not None:
            parts.append(f"action={self.action}")
        return "&".join(parts)


def parse_time(text: str, name: str, *, end: bool = False) -> datetime:
    """An ISO 8601 date or date-time, as an aware UTC datetime."""
    text = text.strip()
    try:
        if _DATE_ONLY.fullmatch(text):
            day = date.fromisoformat(text)
            moment = datetime.combine(day, time(), tzinfo=UTC)
            return moment + timedelta(days=1) if end else moment
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise QueryError(name, f"not a date or time ({_TIME_FORM})") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def parse_action(text: str, name: str = "action") -> Action:
    try:
        return Action(text.strip().lower())
    except ValueError:
        names = ", ".join(a.value for a in Action)
        raise QueryError(name, f"unknown action (one of {names})") from None


def build_query(start: str | None, end: str | None, patient: str | None,
                client: str | None, action: str | None, *,
                names: tuple[str, str, str, str, str] = ("from", "to", "patient", "client",
                                                          "action")) -> AuditQuery:
    """Check and assemble the filters; raises QueryError naming the first bad one."""
    query = AuditQuery(
        start=parse_time(start, names[0]) if start else None,
        end=parse_time(end, names[1], end=True) if end else None,
        patient=_term(patient, names[2]),
        client=_term(client, names[3]),
        action=parse_action(action, names[4]) if action else None,
    )
    if query.start is not None and query.end is not None and query.start >= query.end:
        raise QueryError(names[1], f"must be later than {names[0]}")
    return query


def _term(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > 256:
        raise QueryError(name, "must be 1 to 256 characters")
    return value


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
