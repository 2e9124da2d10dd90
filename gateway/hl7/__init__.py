"""HL7 v2 codec: lazy parsing, terser access, escapes, charsets, batches, ACKs, MLLP framing."""

from gateway.hl7.errors import ErrorCode, Hl7Error, Hl7ParseError
from gateway.hl7.location import (
    ComponentLocation,
    Location,
    error_location,
    parse_component,
    parse_location,
)
from gateway.hl7.message import Header, Message, check_header, parse_message

__all__ = ["ComponentLocation", "ErrorCode", "Header", "Hl7Error", "Hl7ParseError",
           "Location", "Message", "check_header", "error_location", "parse_component",
           "parse_location", "parse_message"]
