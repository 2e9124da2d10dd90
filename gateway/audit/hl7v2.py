"""Audit records for HL7 v2 messages: who sent what about which patient, and the answer.

The edge calls this for every MLLP message it answers, accepted or refused, so a reviewer
sees each one: the sender (MSH-3/MSH-4, the verified certificate subject, the peer
address), the message (type, MSH-10), the patient (PID-3, first repetition, encrypted)
and the acknowledgement code with its table 0357 error code.
"""

from __future__ import annotations

from datetime import datetime

from gateway.audit.patient import reference_from_v2
from gateway.audit.record import SUCCESS, Action, AuditRecord
from gateway.hl7.message import Message, header_or_none

_POSITIVE = frozenset({"AA", "CA"})
_MAX = 256  # header values come from the sender: bounded, whatever they hold


def outcome(ack_code: str, error_code: int | None = None) -> str:
    """SUCCESS for AA/CA, else the ACK code with the first error's table 0357 code."""
    if ack_code in _POSITIVE and error_code is None:
        return SUCCESS
    return ack_code if error_code is None else f"{ack_code}:{error_code}"


def message_access(message: Message | None, *, peer: str, tls_subject: str | None,
                   outcome: str, time: datetime, trace_id: int = 0,
                   detail: str = "") -> AuditRecord:
    """The record of one HL7 v2 message received (refused ones too)."""
    header = header_or_none(message)
    app = header.sending_application[:_MAX] if header else ""
    facility = header.sending_facility[:_MAX] if header else ""
    return AuditRecord(
        Action.INGEST, outcome, time,
        client_id=f"{app}|{facility}" if header else "",
        tls_subject=tls_subject or "",
        sending_application=app,
        sending_facility=facility,
        peer=peer,
        resource_type=header.message_type[:_MAX] if header else "",
        control_id=header.control_id[:_MAX] if header else "",
        patient=reference_from_v2(message) if message is not None else None,
        trace_id=f"{trace_id:032x}" if trace_id else "",
        detail=detail,
    )
