"""Required segments, by the message structure definitions of the message's HL7 version.

hl7apy's `messages.py` and `groups.py` are the standard's abstract message syntax as data:
ADT_A01 is MSH, [{SFT}], EVN, PID, [PD1], ... with each segment's and group's cardinality.
A message is refused for a required segment it lacks, read this way (the rule is looser
than the syntax because real feeds are: the reference corpus holds an OML^O21 whose order
has an OBR but no ORC, and ADT messages without EVN):

- a top-level segment with a minimum of 1 is required (ADT_A01: MSH, PID, PV1), except
  EVN: from v2.3.1 on MSH-9.2 carries the event EVN-1 repeats, and feeds leave EVN out;
- a required top-level group (a sequence with a minimum of 1; a choice requires no one
  branch) must be there: the message holds at least one segment the group defines, at
  any depth; if it holds none, the group's first required segment is named (ORU_R01
  without any segment of its PATIENT_RESULT group: OBR). What is inside a group is not required
  one by one: real orders leave out the ORC of OML_O21's ORDER and the TQ1 of RDE_O11's
  TIMING_ENCODED (timing in ORC-7 or RXE-1, as before v2.5);
- presence is by segment id anywhere in the message: order and the grouping of repeats
  are not checked (real feeds reorder optional segments; a missing PID is what matters).

The structure is MSH-9.3 when it names one this version defines, else the message code
and event (`ADT_A01` for ADT^A01); a message whose structure is neither (ADT^A04 without
MSH-9.3: its structure ADT_A01 is not derivable from hl7apy) is not checked.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from functools import cache
from typing import Any

from gateway.hl7.definitions import LIBRARY_FOR_VERSION
from gateway.hl7.errors import ErrorCode, Hl7Error, Location
from gateway.hl7.message import Message

_SEQUENCE = "sequence"


def structure_of(message: Message) -> str | None:
    """The message structure the message's version defines for it, or None."""
    library = LIBRARY_FOR_VERSION.get(message.header.version)
    if library is None:
        return None
    defined = _messages(library)
    header = message.header
    named = message.get("MSH-9.3").strip()
    if named in defined:
        return named
    derived = f"{header.message_code}_{header.trigger_event}"
    return derived if derived in defined else None


def missing_segments(message: Message) -> list[Hl7Error]:
    """A 100 (segment sequence error) naming each required segment the message lacks."""
    structure = structure_of(message)
    if structure is None:
        return []
    library = LIBRARY_FOR_VERSION[message.header.version]
    present = {segment.id for segment in message.segments()}
    missing = dict.fromkeys(named for named, any_of in requirements(library, structure)
                            if present.isdisjoint(any_of))
    return [Hl7Error(ErrorCode.SEGMENT_SEQUENCE_ERROR,
                     f"required segment {named} is missing (message structure "
                     f"{structure}, HL7 v{message.header.version})",
                     Location(named))
            for named in missing]


# One requirement: the segment named when it is not met, and the segment ids that meet it.
Requirement = tuple[str, frozenset[str]]
# Required by the syntax, left out by real feeds (see the module doc).
_EXEMPT = frozenset({"EVN"})


@cache
def requirements(library: str, structure: str) -> tuple[Requirement, ...]:
    """What a structure requires, in definition order (see the module doc)."""
    groups = _groups(library)
    found: list[Requirement] = []
    _, children = _messages(library)[structure]
    for name, child, cardinality, element in children:
        if cardinality[0] < 1 or name in _EXEMPT:
            continue
        if element == "SEG":
            found.append((name, frozenset({name})))
        else:
            _require_group(child if child is not None else groups[name], groups, found)
    return tuple(found)


def _require_group(definition: Any, groups: Mapping[str, Any],
                   found: list[Requirement]) -> None:
    kind, children = definition
    if kind != _SEQUENCE:
        return  # a choice: any one branch will do
    first = _first_required(definition, groups)
    if first is not None:
        found.append((first, frozenset(_segment_ids(definition, groups))))


def _first_required(definition: Any, groups: Mapping[str, Any]) -> str | None:
    kind, children = definition
    if kind != _SEQUENCE:
        return None
    for name, child, cardinality, element in children:
        if cardinality[0] < 1:
            continue
        if element == "SEG":
            return str(name)
        inner = _first_required(child if child is not None else groups[name], groups)
        if inner is not None:
            return inner
    return None


def _segment_ids(definition: Any, groups: Mapping[str, Any]) -> set[str]:
    _, children = definition
    ids: set[str] = set()
    for name, child, _, element in children:
        if element == "SEG":
            ids.add(name)
        else:
            ids |= _segment_ids(child if child is not None else groups[name], groups)
    return ids


@cache
def _messages(library: str) -> Mapping[str, Any]:
    messages: Mapping[str, Any] = _module(library, "messages").MESSAGES
    return messages


@cache
def _groups(library: str) -> Mapping[str, Any]:
    groups: Mapping[str, Any] = _module(library, "groups").GROUPS
    return groups


def _module(library: str, name: str) -> Any:
    return importlib.import_module(f"hl7apy.v{library.replace('.', '_')}.{name}")
