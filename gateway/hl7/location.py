"""Positions in an HL7 v2 message, and the one parser of their text form.

    PID-5      field 5 of the first PID          OBX[3]-5     field 5 of the third OBX
    PID-3(2).4 component 4 of repetition 2       PID-3.4.2    subcomponent 2 of component 4
    CX.4       component 4 of a CX (data-type tables name positions inside a data type)

The codec reads and writes at these positions (`Message.get`/`set`), the mapping tables
name them, a translation error carries one and an ERR segment reports one (ERR-2). Parsing
is cached per text: the same few hundred paths are read for every message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_LOCATION = re.compile(
    r"(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<seq>\d+)\])?"
    r"(?:-(?P<field>\d+)(?:\((?P<rep>\d+)\))?(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?)?"
)
# What a translation error may name below a subcomponent: a data type inside a
# subcomponent (OBR-32.1 read as XCN, its XCN.9 as HD: OBR-32.1.9.1).
_DEEPER = re.compile(r"(?:\.\d+)+")
_COMPONENT = re.compile(r"(?P<type>[A-Z][A-Z0-9]{1,3})\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?")


@dataclass(frozen=True, slots=True)
class Location:
    """Where in a message: segment id, its sequence (1-based occurrence), field, component,
    repetition, subcomponent. `repetition` None is the whole field (`PID-3`), 1 its first
    repetition (`PID-3(1)`); a missing component or subcomponent is None."""

    segment: str
    sequence: int = 1
    field: int | None = None
    component: int | None = None
    repetition: int | None = None
    subcomponent: int | None = None

    def __str__(self) -> str:
        text = self.segment if self.sequence == 1 else f"{self.segment}[{self.sequence}]"
        if self.field is not None:
            text += f"-{self.field}"
            if self.repetition is not None and self.repetition > 1:
                text += f"({self.repetition})"
            if self.component is not None:
                text += f".{self.component}"
                if self.subcomponent is not None:
                    text += f".{self.subcomponent}"
        return text


@dataclass(frozen=True, slots=True)
class ComponentLocation:
    """A position inside a data type, as data-type tables name it: `CX.4`, `XAD.1.1`."""

    datatype: str
    component: int
    subcomponent: int | None = None

    def __str__(self) -> str:
        sub = f".{self.subcomponent}" if self.subcomponent is not None else ""
        return f"{self.datatype}.{self.component}{sub}"


@lru_cache(maxsize=4096)
def parse_location(text: str) -> Location:
    """`PID-3(2).4` as a Location; ValueError for text that is not one.

    Field 0 is the segment id itself (readable, not writable); every other position counts
    from 1.
    """
    match = _LOCATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a terser path: {text!r}")
    return _location(match, text)


@lru_cache(maxsize=4096)
def error_location(text: str) -> Location | None:
    """The Location a translation error names, for its ERR segment; None for no v2 position
    (a FHIR element path, an empty text, a segment without a field).

    A position below a subcomponent (a data type inside a subcomponent) is reported at that
    subcomponent: ERR-2 names nothing deeper.
    """
    match = _LOCATION.match(text)
    if match is None or match.group("field") is None:
        return None
    rest = text[match.end():]
    if rest and (match.group("sub") is None or _DEEPER.fullmatch(rest) is None):
        return None
    try:
        return _location(match, text)
    except ValueError:
        return None


def parse_component(text: str) -> ComponentLocation | None:
    """`CX.4.1` as a ComponentLocation, None for text that is not one (the number is not
    checked against the data type: that is the caller's table)."""
    match = _COMPONENT.fullmatch(text)
    if match is None:
        return None
    sub = match.group("sub")
    return ComponentLocation(match.group("type"), int(match.group("comp")),
                             int(sub) if sub is not None else None)


def _location(match: re.Match[str], text: str) -> Location:
    g = match.groupdict()
    numbers = [int(g[k]) for k in ("seq", "rep", "comp", "sub") if g[k] is not None]
    if any(n < 1 for n in numbers):
        raise ValueError(f"terser path positions start at 1: {text!r}")
    return Location(
        segment=g["seg"],
        sequence=int(g["seq"] or 1),
        field=int(g["field"]) if g["field"] is not None else None,
        component=int(g["comp"]) if g["comp"] is not None else None,
        repetition=int(g["rep"]) if g["rep"] is not None else None,
        subcomponent=int(g["sub"]) if g["sub"] is not None else None,
    )
