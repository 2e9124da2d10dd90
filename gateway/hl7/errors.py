"""HL7 v2 errors: what went wrong, where (a Location), and which HL7 table 0357 code names it."""

from __future__ import annotations

from enum import IntEnum

from gateway.hl7.location import Location

__all__ = ["ErrorCode", "Hl7Error", "Hl7ParseError", "Location"]


class ErrorCode(IntEnum):
    """HL7 table 0357 (message error condition codes) that Isthmus reports."""

    ACCEPTED = 0
    SEGMENT_SEQUENCE_ERROR = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE_ERROR = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT_CODE = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION_ID = 203
    DUPLICATE_KEY = 205
    APPLICATION_RECORD_LOCKED = 206
    APPLICATION_INTERNAL_ERROR = 207

    @property
    def text(self) -> str:
        return _CODE_TEXT[self]


_CODE_TEXT = {
    ErrorCode.ACCEPTED: "Message accepted",
    ErrorCode.SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    ErrorCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCode.DATA_TYPE_ERROR: "Data type error",
    ErrorCode.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCode.UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    ErrorCode.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrorCode.UNSUPPORTED_VERSION_ID: "Unsupported version id",
    ErrorCode.DUPLICATE_KEY: "Duplicate key identifier",
    ErrorCode.APPLICATION_RECORD_LOCKED: "Application record locked",
    ErrorCode.APPLICATION_INTERNAL_ERROR: "Application internal error",
}


class Hl7Error(Exception):
    """A message that cannot be accepted as it is. `reason` never carries field values."""

    def __init__(
        self,
        code: ErrorCode,
        reason: str,
        location: Location | None = None,
        *,
        reject: bool = False,
    ) -> None:
        self.code = code
        self.reason = reason
        self.location = location
        # AR (reject) rather than AE (error): the message cannot be processed at all.
        self.reject = reject
        super().__init__(f"{location}: {reason}" if location else reason)


class Hl7ParseError(Hl7Error):
    """The bytes are not a parseable HL7 v2 message."""
