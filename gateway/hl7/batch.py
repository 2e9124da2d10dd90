"""Unwrap HL7 batch files (FHS/BHS … BTS/FTS) and concatenated messages into messages."""

from __future__ import annotations

import re

from gateway.hl7.charset import UTF8_BOM

# A segment starts a new unit when it follows a terminator (or starts the data) and its id
# is the whole word: a line of text that merely begins with "MSH" or "BTS" starts nothing.
_UNIT_START = re.compile(
    rb"(?:^|(?<=\r)|(?<=\n))(?=(?:MSH|FHS|BHS|BTS|FTS)(?:[^A-Za-z0-9]|\Z))"
)
_ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")


def split_messages(data: bytes) -> list[bytes]:
    """Each message's bytes, in order; batch and file envelope segments are dropped."""
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    starts = [m.start() for m in _UNIT_START.finditer(data)]
    if not starts:
        return [data] if data.strip() else []
    messages: list[bytes] = []
    leading = data[: starts[0]]
    if leading.strip():
        # Bytes before the first header are not a message we can place; keep them so the
        # caller's parse refuses them clearly instead of dropping them silently.
        messages.append(leading)
    bounds = [*starts, len(data)]
    for begin, end in zip(bounds, bounds[1:], strict=False):
        unit = data[begin:end]
        if unit.startswith(_ENVELOPE):
            continue
        messages.append(unit)
    return messages


def is_batch(data: bytes) -> bool:
    stripped = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    return stripped.startswith((b"FHS", b"BHS"))
