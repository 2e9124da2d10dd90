"""Character sets of HL7 table 0211 (MSH-18) and how their bytes become text."""

from __future__ import annotations

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


def codec_for(charset: str, default: str) -> str:
    """The Python codec for an MSH-18 value; `default` when the field is empty."""
    name = charset.strip()
    if not name:
        return default
    codec = CHARSETS.get(name.upper())
    if codec is None:
        raise Hl7ParseError(
            ErrorCode.TABLE_VALUE_NOT_FOUND,
            f"character set '{name[:32]}' is not supported",
            Location("MSH", 1, 18),
            reject=True,
        )
    return codec


def decode(data: bytes, codec: str) -> str:
    """Decode message bytes strictly, naming the first bad byte offset (never its value)."""
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        raise Hl7ParseError(
            ErrorCode.DATA_TYPE_ERROR,
            f"message bytes are not valid {codec} (first bad byte at offset {exc.start})",
            Location("MSH", 1, 18),
        ) from None
