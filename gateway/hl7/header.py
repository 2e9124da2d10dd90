"""The MSH header: the fields the gateway itself acts on (routing, acknowledging, checking),
read from a message's MSH segment, and the checks every accepted message passes."""

from __future__ import annotations

import re
from typing import NamedTuple

from gateway.hl7.delimiters import Delimiters
from gateway.hl7.errors import ErrorCode, Hl7ParseError, Location

# Every HL7 v2 version the gateway accepts (MSH-12), oldest first.
VERSIONS: tuple[str, ...] = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6",
                             "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2")
SUPPORTED_VERSIONS = frozenset(VERSIONS)
ACK_TYPES = frozenset({"AL", "NE", "ER", "SU"})
# What an MSH-12 version id or an MSH-15/16 code looks like; anything else is not echoed.
_VERSION_LIKE = re.compile(r"\d\.\d{1,2}(?:\.\d{1,2})?")
_ACK_LIKE = re.compile(r"[A-Z]{2}")


class Header(NamedTuple):
    """The MSH fields the gateway itself acts on, in their wire (escaped) form.

    Immutable as the frozen dataclass it was, but a NamedTuple: made once per message on
    the MLLP and translation paths, where the dataclass's thirteen frozen slot setters cost
    ~20 k instructions and a tuple's construction a few hundred."""

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_code: str
    trigger_event: str
    message_structure: str
    control_id: str
    processing_id: str
    version: str
    accept_ack_type: str
    application_ack_type: str
    charset: str

    @property
    def message_type(self) -> str:
        return f"{self.message_code}^{self.trigger_event}" if self.trigger_event else (
            self.message_code
        )

    @property
    def enhanced_mode(self) -> bool:
        """HL7 v2.5.1 §2.9.3: enhanced acknowledgement when MSH-15 or MSH-16 is valued."""
        return bool(self.accept_ack_type or self.application_ack_type)


def read_header(fields: list[str], delimiters: Delimiters) -> Header:
    """The header of an MSH segment split into its fields (MSH-n at index n)."""
    if len(fields) < 19:
        fields = fields + [""] * (19 - len(fields))
    repetition = delimiters.repetition
    component = delimiters.component
    # The first repetition, and its first component, of a field: each cut only when there
    # is something to cut (a split makes a list and its strings: splitting every field
    # cost ~3.5k of this function's ~13k instructions).
    msh9 = fields[9]
    if repetition in msh9:
        msh9 = msh9.split(repetition, 1)[0]
    message_type = msh9.split(component, 3)
    if len(message_type) < 3:
        message_type += [""] * (3 - len(message_type))
    processing_id = fields[11]
    if repetition in processing_id:
        processing_id = processing_id.split(repetition, 1)[0]
    if component in processing_id:
        processing_id = processing_id.split(component, 1)[0]
    version = fields[12]
    if repetition in version:
        version = version.split(repetition, 1)[0]
    if component in version:
        version = version.split(component, 1)[0]
    charset = fields[18]
    if repetition in charset:
        charset = charset.split(repetition, 1)[0]
    # Made as the tuple it is, in field order: `Header(...)` would add a Python call.
    return _new_header(Header, (
        fields[3],  # sending_application
        fields[4],  # sending_facility
        fields[5],  # receiving_application
        fields[6],  # receiving_facility
        message_type[0],  # message_code
        message_type[1],  # trigger_event
        message_type[2],  # message_structure
        fields[10],  # control_id
        processing_id,
        version,
        # A blank acknowledgment type (a sender padding MSH-15 with a space) is not valued:
        # original acknowledgment mode, as when the field is empty.
        fields[15].strip(),  # accept_ack_type
        fields[16].strip(),  # application_ack_type
        charset,
    ))


_new_header = tuple.__new__


def check_header(header: Header) -> None:
    """Refuse a header the gateway cannot acknowledge or route (MSH-9, -10, -12, -15, -16)."""
    if not header.message_code:
        raise Hl7ParseError(ErrorCode.REQUIRED_FIELD_MISSING, "message type is empty",
                            Location("MSH", 1, 9), reject=True)
    if not header.control_id:
        raise Hl7ParseError(ErrorCode.REQUIRED_FIELD_MISSING,
                            "message control id is empty",
                            Location("MSH", 1, 10), reject=True)
    if not header.version:
        raise Hl7ParseError(ErrorCode.REQUIRED_FIELD_MISSING, "version id is empty",
                            Location("MSH", 1, 12), reject=True)
    if header.version not in SUPPORTED_VERSIONS:
        raise Hl7ParseError(ErrorCode.UNSUPPORTED_VERSION_ID,
                            f"version {_shown(header.version, _VERSION_LIKE)} is not supported",
                            Location("MSH", 1, 12), reject=True)
    for number, value in ((15, header.accept_ack_type), (16, header.application_ack_type)):
        if value and value not in ACK_TYPES:
            raise Hl7ParseError(ErrorCode.TABLE_VALUE_NOT_FOUND,
                                f"acknowledgment type {_shown(value, _ACK_LIKE)} is not one of "
                                "AL, NE, ER, SU",
                                Location("MSH", 1, number))


def _shown(value: str, pattern: re.Pattern[str]) -> str:
    """A header value for an error reason, only when it cannot be anything but what it claims.

    When a sender's segment terminators are broken, the "MSH" line runs on into PID and
    MSH-12 or MSH-15 can hold a patient's name or identifier: those are never echoed.
    """
    return f"'{value}'" if pattern.fullmatch(value) else "(value not shown)"


