"""What one audit record says: who accessed what, when, why, and with what outcome.

Callers describe an access with an `AuditRecord`; the log seals it (PHI encrypted,
canonical bytes, chain hash) and commits it before the access is granted. Patient
references, resource ids and query values are PHI and are only ever stored encrypted;
everything else here identifies systems and messages, not people.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import NamedTuple


class Action(StrEnum):
    """What was done with the data; the `--action` filter takes these names."""

    INGEST = "ingest"        # an HL7 v2 message received over MLLP
    TRANSLATE = "translate"  # a message translated between HL7 v2 and FHIR
    READ = "read"            # one resource (or stored message) read
    SEARCH = "search"        # a query, including a reviewer's search of this log
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    DELIVER = "deliver"      # data sent on to a backend
    TOKEN = "token"          # an access token issued or refused
    EXPORT = "export"        # an export of this audit trail
    NOTIFY = "notify"        # a change notification (webhook) a backend sent the gateway


SUCCESS = "success"


class AuditRecord(NamedTuple):
    """One access, as the code that performed it describes it.

    `outcome` is SUCCESS or a short failure code: the HL7 ACK code and table 0357 error
    (`AR:207`), an HTTP status (`401`), or a word (`store-unavailable`). `time` defaults
    to the moment the log receives the record. (A NamedTuple: immutable, and built on
    every message's hot path.)
    """

    action: Action
    outcome: str = SUCCESS
    time: datetime | None = None
    # who
    client_id: str = ""            # the calling system: OAuth client, reviewer, MSH-3|MSH-4
    user: str = ""                 # the person behind it, when known
    tls_subject: str = ""          # verified client certificate subject
    sending_application: str = ""  # MSH-3
    sending_facility: str = ""     # MSH-4
    peer: str = ""                 # network address of the caller
    # what
    resource_type: str = ""        # FHIR resource type, or the HL7 message type (ADT^A01)
    control_id: str = ""           # the source's control id (MSH-10) or request id
    patient: str | None = None     # PHI: 'AUTHORITY|ID' or 'Patient/123'
    resource_id: str | None = None  # PHI: which resource or stored message
    query: str | None = None       # PHI: the query as received
    query_shape: str = ""          # the query with values removed ('patient=*&from=*')
    # why
    purpose: str = ""              # PurposeOfUse code (v3 ActReason), e.g. HCOMPL
    profile: str = ""              # minimum-necessary task profile that applied
    # correlation
    trace_id: str = ""             # W3C trace id of the request
    detail: str = ""               # a short note without PHI (e.g. 'duplicate')

    @property
    def succeeded(self) -> bool:
        return self.outcome == SUCCESS


def timestamp(moment: datetime) -> str:
    """UTC ISO 8601 with microseconds and Z: fixed width, so text order is time order."""
    if moment.tzinfo is not UTC:
        moment = (moment.replace(tzinfo=UTC) if moment.tzinfo is None
                  else moment.astimezone(UTC))
    # isoformat() without timespec costs half as much, and shows the microseconds unless
    # they are 0 (then the fixed width needs the timespec form).
    text = moment.isoformat() if moment.microsecond else moment.isoformat(
        timespec="microseconds")
    return text[:-6] + "Z"


def system_clock() -> datetime:
    """The system's UTC time: the audit log's clock unless one is given (tests, tools)."""
    return datetime.now(UTC)


class _Now:
    """`timestamp(system_clock())` for every record: the clock read once as integer
    microseconds, the text of its second made once a second (building and formatting a
    datetime was ~2 us, a tenth of sealing a record)."""

    __slots__ = ("_second",)

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")  # one attribute: read and set as one

    def __call__(self) -> str:
        second, micros = divmod(time.time_ns() // 1000, 1_000_000)
        known, prefix = self._second
        if second != known:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self._second = (second, prefix)
        return f"{prefix}{micros:06d}Z"


now_timestamp = _Now()


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))

