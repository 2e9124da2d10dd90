"""Build HL7 v2 acknowledgements (ACK with MSA and ERR) for an inbound message.

HL7 v2.5.1 §2.9: the ACK swaps sender and receiver, keeps the inbound version and encoding
characters, and echoes the inbound control id in MSA-2. ERR uses ERR-2/3/4 (error
location, HL7 table 0357 code, severity) from v2.5 on and ERR-1 before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache

from gateway.hl7.charset import CHARSETS
from gateway.hl7.delimiters import DEFAULT_DELIMITERS, Delimiters
from gateway.hl7.errors import ErrorCode, Hl7Error, Location
from gateway.hl7.escape import escape
from gateway.hl7.message import SUPPORTED_VERSIONS, VERSIONS, Header

# Acknowledgment codes, HL7 table 0008.
APPLICATION_ACCEPT = "AA"
APPLICATION_ERROR = "AE"
APPLICATION_REJECT = "AR"
COMMIT_ACCEPT = "CA"
COMMIT_ERROR = "CE"
COMMIT_REJECT = "CR"

_VERSION_RANK = {version: rank for rank, version in enumerate(VERSIONS)}


def _version_at_least(version: str, floor: str) -> bool:
    rank = _VERSION_RANK.get(version)
    return rank is None or rank >= _VERSION_RANK[floor]


def ack_code(errors: Sequence[Hl7Error], enhanced: bool) -> str:
    """AA/AE/AR (original mode) or CA/CE/CR (enhanced accept ACK) for these errors."""
    if not errors:
        return COMMIT_ACCEPT if enhanced else APPLICATION_ACCEPT
    if any(e.reject for e in errors):
        return COMMIT_REJECT if enhanced else APPLICATION_REJECT
    return COMMIT_ERROR if enhanced else APPLICATION_ERROR


def should_send_accept_ack(accept_ack_type: str, code: str) -> bool:
    """HL7 table 0155 for MSH-15: AL always, NE never, ER only on error, SU only on success."""
    kind = accept_ack_type or "AL"
    if kind == "NE":
        return False
    if kind == "ER":
        return code != COMMIT_ACCEPT
    if kind == "SU":
        return code == COMMIT_ACCEPT
    return True


def should_send_application_ack(application_ack_type: str, code: str) -> bool:
    """HL7 table 0155 for MSH-16 (enhanced mode): AL always, ER only on error, SU only on
    success; NE or empty never. Empty counts as NE, not AL: a sender that left MSH-16 out
    is not waiting for an unsolicited message on its connection."""
    kind = application_ack_type
    if kind == "AL":
        return True
    if kind == "ER":
        return code != APPLICATION_ACCEPT
    if kind == "SU":
        return code == APPLICATION_ACCEPT
    return False


def build_ack(
    header: Header | None,
    code: str,
    errors: Sequence[Hl7Error],
    *,
    control_id: str,
    now: datetime,
    delimiters: Delimiters = DEFAULT_DELIMITERS,
    sending_application: str = "ISTHMUS",
) -> str:
    """The ACK message text (CR-terminated segments) answering `header`.

    `header` is None when the inbound bytes had no readable MSH: the ACK then uses default
    delimiters, version 2.5.1 and an empty MSA-2, as there is no control id to echo.
    """
    d = delimiters
    version = header.version if header and header.version in SUPPORTED_VERSIONS else "2.5.1"
    head, tail = _msh_around_control_id(
        d,
        header.receiving_application if header and header.receiving_application
        else sending_application,
        header.receiving_facility if header else "",
        header.sending_application if header else "",
        header.sending_facility if header else "",
        header.trigger_event if header else "",
        # HL7 table 0103; anything else would echo junk back into the ACK.
        header.processing_id if header and header.processing_id in ("P", "T", "D") else "P",
        version,
        # The ACK is written in the inbound character set, so it says which one (MSH-18).
        header.charset if header and header.charset.strip().upper() in CHARSETS else "",
    )
    msh = (f"{head[0]}{hl7_timestamp(now)}{head[1]}{escape(control_id, d)}{tail}")
    msa = ["MSA", code, header.control_id if header else ""]
    if errors and not _version_at_least(version, "2.7"):
        # MSA-3 (text message) is what many older receivers show to their operators.
        msa.append(escape(_summary(errors[0]), d))
    segments = [msh, d.field.join(msa)]
    segments.extend(_err_segment(e, version, d) for e in errors)
    return "\r".join(segments) + "\r"


@lru_cache(maxsize=1024)
def _msh_around_control_id(d: Delimiters, sending_app: str, sending_facility: str,
                           receiving_app: str, receiving_facility: str, trigger: str,
                           processing_id: str, version: str,
                           charset: str) -> tuple[tuple[str, str], str]:
    """The fixed parts of an ACK's MSH for one conversation, around MSH-7 and MSH-10.

    Senders reuse the same few headers for every message, so this is built once per
    sender and event rather than per message.
    """
    before_time = d.field.join(["MSH", d.encoding_characters, sending_app, sending_facility,
                                receiving_app, receiving_facility, ""])
    between = d.field.join(["", "", _message_type(version, trigger, d), ""])
    after = d.field.join(["", processing_id, version])
    if charset:
        after += d.field * 6 + charset
    return (before_time, between), after


def _message_type(version: str, trigger: str, d: Delimiters) -> str:
    if not _version_at_least(version, "2.3"):
        return "ACK"
    if not _version_at_least(version, "2.3.1"):
        return f"ACK{d.component}{trigger}" if trigger else "ACK"
    return f"ACK{d.component}{trigger}{d.component}ACK" if trigger else (
        f"ACK{d.component}{d.component}ACK"
    )


@lru_cache(maxsize=4)
def _second_stamp(second: datetime) -> str:
    return second.strftime("%Y%m%d%H%M%S%z")


def hl7_timestamp(now: datetime) -> str:
    """DTM to the second with the UTC offset; cached per second (strftime is slow)."""
    return _second_stamp(now.replace(microsecond=0))


def _summary(error: Hl7Error) -> str:
    where = f"{error.location}: " if error.location else ""
    return f"{where}{error.reason}"[:80]


def _err_segment(error: Hl7Error, version: str, d: Delimiters) -> str:
    loc = error.location or Location("MSH", 1)
    code = int(error.code)
    text = ErrorCode(code).text
    if _version_at_least(version, "2.5"):
        location = d.component.join(
            _opt(v) for v in (loc.segment, loc.sequence, loc.field, loc.repetition,
                              loc.component, loc.subcomponent)
        ).rstrip(d.component)
        fields = [
            "ERR",
            "",
            location,
            d.component.join((str(code), escape(text, d), "HL70357")),
            "E" if code else "I",
            "", "", "",
            escape(error.reason, d),
        ]
    else:
        # ERR-1 (ELD): segment id ^ sequence ^ field position ^ code (CE: id & text & table)
        coded = d.subcomponent.join((str(code), escape(text, d), "HL70357"))
        fields = [
            "ERR",
            d.component.join((loc.segment, str(loc.sequence), _opt(loc.field), coded)),
        ]
    return d.field.join(fields)


def _opt(value: int | str | None) -> str:
    return "" if value is None else str(value)
