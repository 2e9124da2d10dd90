"""Character sets of HL7 table 0211 (MSH-18) and how their bytes become text."""

from __future__ import annotations

import codecs
import re

from gateway.hl7.errors import ErrorCode, Hl7ParseError, Location

# HL7 table 0211 value -> Python codec. Only sets whose bytes keep the MSH segment ASCII
# (so MSH-18 can be read before decoding) are listed; anything else is refused clearly.
CHARSETS: dict[str, str] = {
    # Senders that declare ASCII routinely send UTF-8 (curly quotes, U+FFFD); UTF-8 is a
    # strict superset of ASCII, so reading it as UTF-8 loses nothing and refuses no valid one.
    "ASCII": "utf-8",
    "ISO IR6": "utf-8",
    "8859/1": "iso-8859-1",
    "8859/2": "iso-8859-2",
    "8859/3": "iso-8859-3",
    "8859/4": "iso-8859-4",
    "8859/5": "iso-8859-5",
    "8859/6": "iso-8859-6",
    "8859/7": "iso-8859-7",
    "8859/8": "iso-8859-8",
    "8859/9": "iso-8859-9",
    "8859/15": "iso-8859-15",
    "ISO IR100": "iso-8859-1",
    "UNICODE UTF-8": "utf-8",
    # Pre-2.5 'UNICODE' had no encoding form; in practice senders mean UTF-8.
    "UNICODE": "utf-8",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc-kr",
}

UTF8_BOM = b"\xef\xbb\xbf"
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


# When a sender's segment terminators are broken, "MSH-18" can be a patient's name: an
# unsupported value is echoed in an error only when it is recognisably an encoding name.
_ENCODING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,23}")


def codec_for(charset: str, default: str) -> str:
    """The Python codec for an MSH-18 value; `default` when the field is empty.

    `default` may be a Python codec name ("utf-8") or a table 0211 value ("8859/1").
    """
    name = charset.strip()
    if not name:
        return CHARSETS.get(default.strip().upper(), default)
    codec = CHARSETS.get(name.upper())
    if codec is None:
        raise Hl7ParseError(
            ErrorCode.TABLE_VALUE_NOT_FOUND,
            f"character set {_shown(name)} is not supported",
            Location("MSH", 1, 18),
            reject=True,
        )
    return codec


def _shown(name: str) -> str:
    """The MSH-18 value for an error reason: quoted if it names a known encoding with a
    number in it (UTF-8, WINDOWS-1252, LATIN1), otherwise withheld. Codec aliases without a
    digit ("ARABIC", "GREEK") are also languages, which a run-on PID could put here."""
    if _ENCODING_NAME.fullmatch(name) and any(c.isdigit() for c in name):
        try:
            codecs.lookup(name)
        except LookupError:
            pass
        else:
            return f"'{name}'"
    return "(value not shown; see HL7 table 0211)"


def decode(data: bytes, codec: str) -> str:
    """Decode message bytes strictly, naming where the first bad byte is (never its value).

    The location is MSH-18, the declaration the bytes contradict; the reason says which
    segment (by number, not content) holds the byte.
    """
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        segment = len(_LINE_BREAK.findall(data, 0, exc.start)) + 1
        raise Hl7ParseError(
            ErrorCode.DATA_TYPE_ERROR,
            f"message bytes are not valid {codec} (first bad byte in segment {segment}, "
            f"offset {exc.start})",
            Location("MSH", 1, 18),
        ) from None
