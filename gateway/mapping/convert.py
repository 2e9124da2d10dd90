"""HL7 v2 text to FHIR primitive values, and back: the value formats the tables rely on.

Each converter takes the unescaped v2 text (never empty) and returns the JSON value for the
FHIR primitive, or raises ConversionError saying why. Dates keep their precision (YYYY,
YYYYMM stay a year, a year-month) and their time-zone offset; a time of day without an
offset gets the configured site offset, because FHIR requires one and guessing UTC would
move the instant.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.mapping.errors import (
    ConversionError as ConversionError,  # defined with the layer's root
)

_DTM = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?)?)?"
    r"([+-]\d{4})?$")
MSH7_OFFSET = re.compile(r"\d{4,14}(?:\.\d{1,4})?([+-])(\d{2})(\d{2})$")
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?([+-]\d{4})?$")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)$")
_INTEGER = re.compile(r"[+-]?\d+$")
_CODE_SPACES = re.compile(r"\s+")
_SPACE = re.compile(r"\s")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}$")
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+$")


Converter = Callable[[str], Any]
_MONTH_DAYS = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# The last day of each month as two digits, February's in a leap year.
_LAST_DAY = {f"{m:02d}": f"{29 if m == 2 else days:02d}" for m, days in enumerate(_MONTH_DAYS)
             if m}


class Converters:
    """The converters for one site: the time-zone offset for local times is site policy."""

    def __init__(self, default_offset: str = "+00:00") -> None:
        if not re.fullmatch(r"[+-]\d{2}:\d{2}", default_offset):
            raise ValueError("the default offset must look like +01:00")
        self.default_offset = default_offset
        self._by_type: dict[str, Converter] = {
            "string": to_string, "markdown": to_string, "code": to_code, "id": to_id,
            "uri": to_uri, "url": to_uri, "canonical": to_uri, "oid": to_uri, "uuid": to_uri,
            "decimal": to_decimal, "integer": to_integer, "unsignedInt": to_unsigned_int,
            "positiveInt": to_positive_int, "boolean": to_boolean, "date": to_date,
            "dateTime": self.to_date_time, "instant": self.to_instant, "time": to_time,
            "base64Binary": to_base64,
        }

    def for_type(self, fhir_type: str) -> Converter:
        try:
            return self._by_type[fhir_type]
        except KeyError:
            raise KeyError(f"no converter to the FHIR type {fhir_type}") from None

    def to_date_time(self, text: str) -> str:
        return date_time(text, self.default_offset, "dateTime")

    def to_instant(self, text: str) -> str:
        return date_time(text, self.default_offset, "instant")


def to_string(text: str) -> str:
    return text


def to_code(text: str) -> str:
    # FHIR codes have no leading, trailing or doubled whitespace.
    code = text.strip()
    if "  " in code or "\t" in code or "\n" in code or "\r" in code:
        code = _CODE_SPACES.sub(" ", code)
    if not code:
        raise ConversionError("is not a valid code", text)
    return code


def to_id(text: str) -> str:
    text = text.strip()
    if not _ID.match(text):
        raise ConversionError("is not a valid id (letters, digits, '-', '.', up to 64)", text)
    return text


def to_uri(text: str) -> str:
    value = text.strip()  # senders pad values; a URI never starts or ends with a space
    if not value:
        raise ConversionError("is not a valid URI", text)
    if _SPACE.search(value):
        # A namespace id such as 'NORTH HOSPITAL' used as an identifier system: spaces are
        # percent-encoded (reversibly) rather than failing the whole message.
        value = _SPACE.sub(lambda m: f"%{ord(m.group()):02X}", value)
    return value


def to_decimal(text: str) -> Decimal:
    # Decimal keeps the sender's precision: '1.50' stays 1.50 on the wire.
    value = text.strip()
    if not _NUMBER.match(value):
        raise ConversionError("is not a valid number", text)
    try:
        return Decimal(value)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid numbers
        raise ConversionError("is not a valid number", text) from None


def to_integer(text: str) -> int:
    value = text.strip()
    if not _INTEGER.match(value):
        raise ConversionError("is not a valid integer", text)
    number = int(value)
    if not -2**31 <= number < 2**31:
        raise ConversionError("is out of the 32-bit integer range", text)
    return number


def to_unsigned_int(text: str) -> int:
    number = to_integer(text)
    if number < 0:
        raise ConversionError("is not a valid non-negative integer", text)
    return number


def to_positive_int(text: str) -> int:
    number = to_integer(text)
    if number < 1:
        raise ConversionError("is not a valid positive integer", text)
    return number


_TRUE = frozenset({"Y", "YES", "TRUE", "T", "1"})
_FALSE = frozenset({"N", "NO", "FALSE", "F", "0"})


def to_boolean(text: str) -> bool:
    value = text.strip().upper()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConversionError("is not a valid yes/no value", text)


def to_date(text: str) -> str:
    """DT or DTM to a FHIR date, keeping YYYY and YYYY-MM precision; a time is dropped."""
    if len(text) == 8 and text.isascii() and text.isdigit() and _valid_day(text):
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"  # YYYYMMDD, the common case
    match = _DTM.match(text.strip())
    if match is None:
        raise ConversionError("is not a valid date", text)
    year, month, day = match.group(1, 2, 3)
    _check_date(text, year, month, day)
    return "-".join(p for p in (year, month, day) if p)


def to_time(text: str) -> str:
    match = _TM.match(text.strip())
    if match is None:
        raise ConversionError("is not a valid time", text)
    hour, minute, second, fraction = match.group(1, 2, 3, 4)
    _check_time(text, hour, minute, second)
    return f"{hour}:{minute or '00'}:{second or '00'}" + (f".{fraction}" if fraction else "")


def to_base64(text: str) -> str:
    value = "".join(text.split())
    if not _BASE64.match(text) or not value:
        raise ConversionError("is not valid base64", text)
    try:
        base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ConversionError("is not valid base64", text) from None
    return value


def encode_base64(text: str) -> str:
    """Text (already unescaped) as base64 of its UTF-8 bytes, for Attachment.data."""
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


# Answers of `date_time` (a pure function) by its arguments: a message repeats its times
# (an ORU's OBR-7 and every OBX-14: 23 conversions of 2 values in a 10-result report).
# The generated module reads it in place before it calls `date_time`.
DATE_TIMES: dict[tuple[str, str, str], str] = {}
_DATE_TIMES_KEPT = 4096


def date_time(text: str, default_offset: str, kind: str) -> str:
    """DTM to a FHIR dateTime or instant; `default_offset` for a time sent without one."""
    key = (text, default_offset, kind)
    value = DATE_TIMES.get(key)
    if value is None:
        value = _date_time(text, default_offset, kind)
        if len(DATE_TIMES) >= _DATE_TIMES_KEPT:
            DATE_TIMES.clear()  # bounded: the times of recent messages, not of all
        DATE_TIMES[key] = value
    return value


def _date_time(text: str, default_offset: str, kind: str) -> str:
    fast = _full_date_time(text, default_offset)
    if fast is not None:
        return fast
    match = _DTM.match(text.strip())
    if match is None:
        raise ConversionError(f"is not a valid {'date/time' if kind == 'dateTime' else kind}",
                              text)
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    _check_date(text, year, month, day)
    if hour is None:
        if kind == "instant":
            raise ConversionError("is not precise enough for an instant (needs a time)", text)
        return "-".join(p for p in (year, month, day) if p)
    if day is None:  # pragma: no cover - the pattern nests, so an hour implies a day
        raise ConversionError("is not a valid date/time", text)
    _check_time(text, hour, minute, second)
    # FHIR dateTime with a time needs seconds and an offset; v2 may send neither.
    clock = f"{hour}:{minute or '00'}:{second or '00'}" + (f".{fraction}" if fraction else "")
    zone = f"{offset[:3]}:{offset[3:]}" if offset else default_offset
    if offset and (int(offset[1:3]) > 14 or int(offset[3:]) > 59):
        raise ConversionError("has an invalid time-zone offset", text)
    return f"{year}-{month}-{day}T{clock}{zone}"


def _full_date_time(text: str, default_offset: str) -> str | None:
    """`date_time` of a valid YYYYMMDDHHMMSS[+/-ZZZZ], the shape nearly every sender uses,
    checked by comparing its two-digit fields as text (a third of a translation's
    conversions are these); None for any other text, which `date_time` reads, or refuses,
    in full."""
    size = len(text)
    if size == 19:
        if not (text[14] in "+-" and text.isascii() and text[15:].isdigit()
                and text[15:17] <= "14" and text[17:] <= "59"):
            return None
        zone = f"{text[14:17]}:{text[17:]}"
    elif size == 14:
        if not text.isascii():
            return None
        zone = default_offset
    else:
        return None
    head = text[:14]
    if not (head.isdigit() and _valid_day(head) and head[8:10] <= "23"
            and head[10:12] <= "59" and head[12:14] <= "60"):
        return None
    return (f"{head[:4]}-{head[4:6]}-{head[6:8]}T{head[8:10]}:{head[10:12]}:{head[12:14]}"
            f"{zone}")


def _valid_day(digits: str) -> bool:
    """Whether ASCII digits YYYYMMDD (perhaps followed by more) name a calendar day."""
    month, day = digits[4:6], digits[6:8]
    if not ("01" <= month <= "12" and "01" <= day <= _LAST_DAY[month]):
        return False
    return day != "29" or month != "02" or calendar.isleap(int(digits[:4]))


def _check_date(text: str, year: str, month: str | None, day: str | None) -> None:
    if month is not None and not 1 <= int(month) <= 12:
        raise ConversionError("is not a valid date", text)
    if day is not None and month is not None:
        # calendar.monthrange's answer without its weekday arithmetic (hot path).
        m = int(month)
        last = 29 if m == 2 and calendar.isleap(int(year)) else _MONTH_DAYS[m]
        if not 1 <= int(day) <= last:
            raise ConversionError("is not a valid date", text)


def _check_time(text: str, hour: str, minute: str | None, second: str | None) -> None:
    if int(hour) > 23 or (minute is not None and int(minute) > 59) or (
            second is not None and int(second) > 60):
        raise ConversionError("is not a valid time", text)


# -- FHIR to v2 -----------------------------------------------------------------------------

_FHIR_DATE_TIME = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def from_date_time(value: str) -> str:
    """A FHIR date, dateTime or instant as v2 DTM, keeping precision and offset."""
    match = _FHIR_DATE_TIME.match(value)
    if match is None:
        raise ConversionError("is not a valid FHIR date/time", value)
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    text = year + (month or "") + (day or "") + (hour or "") + (minute or "")
    if second is not None and (second != "00" or fraction):
        text += second + (f".{fraction[:4]}" if fraction else "")
    elif hour is not None:
        text += second or ""
    if zone:
        text += "+0000" if zone == "Z" else zone.replace(":", "")
    return text


def from_time(value: str) -> str:
    return value.replace(":", "")


def from_value(value: Any) -> str:
    """Any FHIR primitive as v2 text (dates are handled by from_date_time)."""
    if isinstance(value, bool):
        return "Y" if value else "N"
    return str(value)
