"""HL7 v2 escape sequences (v2.5.1 §2.7): decode on read, encode on write."""

from __future__ import annotations

from gateway.hl7.delimiters import Delimiters


def unescape(value: str, delimiters: Delimiters, charset: str = "utf-8") -> str:
    """Replace escape sequences by the characters they stand for.

    Sequences we do not interpret (highlighting `\\H\\`, `\\N\\`, character-set switches,
    `\\Z..\\`) are kept as they are, so nothing a sender wrote is silently dropped.
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
            # A lone escape character with no closing one: keep it literally.
            out.append(value[start:])
            break
        out.append(_decode_sequence(value[start + 1 : end], delimiters, charset))
        i = end + 1
    return "".join(out)


def _decode_sequence(body: str, d: Delimiters, charset: str) -> str:
    simple = {
        "F": d.field,
        "S": d.component,
        "T": d.subcomponent,
        "R": d.repetition,
        "E": d.escape,
        ".br": "\n",
    }
    if d.truncation:
        simple["P"] = d.truncation
    if body in simple:
        return simple[body]
    if body[:1] == "X" and len(body) > 1 and len(body) % 2 == 1:
        try:
            raw = bytes.fromhex(body[1:])
        except ValueError:
            return f"{d.escape}{body}{d.escape}"
        try:
            return raw.decode(charset)
        except (UnicodeDecodeError, LookupError):
            return raw.decode("latin-1")
    return f"{d.escape}{body}{d.escape}"


def escape(value: str, delimiters: Delimiters) -> str:
    """Escape every character that would otherwise be read as a delimiter or terminator."""
    d = delimiters
    specials = {d.escape, d.field, d.component, d.subcomponent, d.repetition, "\r", "\n"}
    if d.truncation:
        specials.add(d.truncation)
    if not any(ch in value for ch in specials):
        return value
    table = {
        d.escape: f"{d.escape}E{d.escape}",
        d.field: f"{d.escape}F{d.escape}",
        d.component: f"{d.escape}S{d.escape}",
        d.subcomponent: f"{d.escape}T{d.escape}",
        d.repetition: f"{d.escape}R{d.escape}",
        "\n": f"{d.escape}.br{d.escape}",
        "\r": f"{d.escape}X0D{d.escape}",
    }
    if d.truncation:
        table[d.truncation] = f"{d.escape}P{d.escape}"
    normalised = value.replace("\r\n", "\n")
    return "".join(table.get(ch, ch) for ch in normalised)
