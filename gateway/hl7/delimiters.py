"""The delimiters a message declares in MSH-1 and MSH-2 (or FHS/BHS for batches)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from gateway.hl7.errors import ErrorCode, Hl7ParseError, Location

HEADER_SEGMENTS = ("MSH", "FHS", "BHS")


@dataclass(frozen=True, slots=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    # HL7 v2.7 §2.5.5.6: an optional fifth encoding character marks truncated values.
    truncation: str = ""

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation

    @classmethod
    def from_header(cls, segment: str) -> Delimiters:
        """Read MSH-1/MSH-2 from the start of a header segment, refusing what cannot work."""
        if len(segment) > 4:
            # Only 'MSH|^~\&|' decides: senders repeat the same few, so checks run once each.
            end = segment.find(segment[3], 4)
            return _from_prefix(segment if end < 0 else segment[: end + 1])
        return _from_prefix(segment)

    @classmethod
    def _parse(cls, segment: str) -> Delimiters:
        name = segment[:3]
        if len(segment) < 4:
            raise Hl7ParseError(
                ErrorCode.REQUIRED_FIELD_MISSING,
                f"{name} segment ends before its field separator",
                Location(name, 1, 1),
                reject=True,
            )
        field = segment[3]
        if field.isalnum() or field in " \r\n":
            raise Hl7ParseError(
                ErrorCode.DATA_TYPE_ERROR,
                "field separator must be a punctuation character",
                Location(name, 1, 1),
                reject=True,
            )
        end = segment.find(field, 4)
        encoding = segment[4:] if end < 0 else segment[4:end]
        if not encoding:
            raise Hl7ParseError(
                ErrorCode.REQUIRED_FIELD_MISSING,
                "encoding characters are missing",
                Location(name, 1, 2),
                reject=True,
            )
        if len(encoding) not in (4, 5):
            raise Hl7ParseError(
                ErrorCode.DATA_TYPE_ERROR,
                "must hold 4 encoding characters (5 with truncation), "
                f"found {len(encoding)}",
                Location(name, 1, 2),
                reject=True,
            )
        chars = field + encoding
        if len(set(chars)) != len(chars) or any(c.isalnum() or c in " \r\n" for c in chars):
            raise Hl7ParseError(
                ErrorCode.DATA_TYPE_ERROR,
                "encoding characters must be distinct punctuation characters",
                Location(name, 1, 2),
                reject=True,
            )
        return cls(
            field=field,
            component=encoding[0],
            repetition=encoding[1],
            escape=encoding[2],
            subcomponent=encoding[3],
            truncation=encoding[4] if len(encoding) == 5 else "",
        )


@lru_cache(maxsize=256)
def _from_prefix(prefix: str) -> Delimiters:
    return Delimiters._parse(prefix)


DEFAULT_DELIMITERS = Delimiters()
