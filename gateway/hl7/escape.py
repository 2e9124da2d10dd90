"""HL7 v2 escape sequences (v2.5.1 §2.7): decode on read, encode on write."""

from __future__ import annotations

import re
from functools import lru_cache

from gateway.hl7.delimiters import Delimiters

# C0 control characters other than TAB, CR and LF: 0x0B and 0x1C are the MLLP frame bytes,
# so a value carrying one would end its frame early. They are written as `\Xhh\`.
_CONTROL = "".join(chr(c) for c in range(0x20) if chr(c) not in "\t\r\n")


def unescape(value: str, delimiters: Delimiters, charset: str = "utf-8") -> str:
    """Replace escape sequences by the characters they stand for.

    Sequences we do not interpret (highlighting `\\H\\`, `\\N\\`, character-set switches,
    `\\Z..\\`, formatting other than `\\.br\\`) are kept as they are, so nothing a sender
    wrote is silently dropped. An escape character without a closing one is kept literally.
    """
    esc = delimiters.escape
    if not esc or esc not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        start = value.find(esc, i)
        if start < 0:
            out.append(value[i:])
            break
        out.append(value[i:start])
        end = value.find(esc, start + 1)
        if end < 0:
            out.append(value[start:])
            break
        out.append(_decode_sequence(value[start + 1 : end], delimiters, charset))
        i = end + 1
    return "".join(out)


@lru_cache(maxsize=64)
def _simple_sequences(d: Delimiters) -> dict[str, str]:
    simple = {
        "F": d.field,
        "S": d.component,
        "T": d.subcomponent,
        "R": d.repetition,
        "E": d.escape,
        ".br": "\n",
    }
    if d.truncation:
        # HL7 v2.7 §2.7.1: \P\ stands for the truncation character.
        simple["P"] = d.truncation
    return simple


def _decode_sequence(body: str, d: Delimiters, charset: str) -> str:
    decoded = _simple_sequences(d).get(body)
    if decoded is not None:
        return decoded
    if body[:1] == "X" and len(body) > 1 and len(body) % 2 == 1:
        try:
            raw = bytes.fromhex(body[1:])
        except ValueError:
            return f"{d.escape}{body}{d.escape}"
        try:
            return raw.decode(charset)
        except (UnicodeDecodeError, LookupError):
            # Hex that is not valid in the message charset: each byte as the character with
            # that code, rather than refusing a whole message over one display detail.
            return raw.decode("latin-1")
    return f"{d.escape}{body}{d.escape}"


@lru_cache(maxsize=64)
def _escape_table(d: Delimiters) -> tuple[re.Pattern[str], dict[str, str]]:
    """The characters `escape` must replace for these delimiters, and their sequences."""
    e = d.escape
    table = {
        d.escape: f"{e}E{e}",
        d.field: f"{e}F{e}",
        d.component: f"{e}S{e}",
        d.subcomponent: f"{e}T{e}",
        d.repetition: f"{e}R{e}",
        "\n": f"{e}.br{e}",
        "\r": f"{e}X0D{e}",
    }
    table.update({c: f"{e}X{ord(c):02X}{e}" for c in _CONTROL})
    if d.truncation:
        table[d.truncation] = f"{e}P{e}"
    pattern = re.compile("[" + "".join(re.escape(c) for c in table) + "]")
    return pattern, table


def escape(value: str, delimiters: Delimiters) -> str:
    """Escape every character that would otherwise be read as a delimiter or terminator.

    CR LF becomes one line break (`\\.br\\`, read back as LF); a lone CR stays a CR
    (`\\X0D\\`). Control characters are written as hex so they cannot break MLLP framing.
    """
    pattern, table = _escape_table(delimiters)
    if pattern.search(value) is None:
        return value
    normalised = value.replace("\r\n", "\n")
    return pattern.sub(lambda m: table[m.group()], normalised)
