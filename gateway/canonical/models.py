"""The records that cross the gateway, each carrying its provenance.

A `Resource` is one clinical or administrative record (a Patient, an Encounter, an
Observation ...) whose content uses FHIR R4 element names, so that every consumer reads one
vocabulary; what makes it canonical rather than FHIR is that it says where it came from
(the source system, the control id, when it was received and last changed) and which
business identifier makes it the same record next time. The models know nothing of HL7
or FHIR wire formats: the mapping layer fills them, codecs write them out.

Plain classes with slots (and named tuples for the two immutable ones), not pydantic
models: the engine makes ~16 Resources a message and checks nothing when it does (its
compiled tables guarantee the shape), so pydantic's per-instance bookkeeping was all cost
(~390 ns a Resource made, ~6 % of an ADT^A01's translation; bench/README.md, ninth
session). Their constructors check what they are given, for callers that are not the
engine; the engine uses `trusted_resource`, which does not.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any, NamedTuple

_new = object.__new__


class Provenance(NamedTuple):
    """Where a record came from (immutable: one is shared by a message's resources)."""

    source_application: str  # MSH-3, or the FHIR client id
    source_facility: str  # MSH-4
    control_id: str  # MSH-10: the source message
    message_type: str  # ADT^A01, ORU^R01 ...
    received_at: datetime
    last_updated: datetime


class BusinessKey(NamedTuple):
    """The identifier that makes a record the same record across messages."""

    system: str = ""
    value: str = ""


# A BusinessKey from a (system, value) pair, by the tuple's own C constructor rather than
# the named tuple's Python-level __new__: the engine and the wire form make one for every
# identified resource of every message.
key_of_pair = partial(tuple.__new__, BusinessKey)


class Resource:
    """One record. `content` holds its elements by FHIR R4 name (no id, no meta)."""

    __slots__ = ("resource_type", "id", "primary", "key", "content", "provenance")

    resource_type: str
    id: str  # deterministic: the same source gives the same id
    primary: bool  # made from a segment (True) or only referred to
    key: BusinessKey | None
    content: dict[str, Any]
    provenance: Provenance

    def __init__(self, resource_type: str, id: str, primary: bool, *,
                 key: BusinessKey | None = None, content: dict[str, Any],
                 provenance: Provenance) -> None:
        if not (type(resource_type) is str and type(id) is str and type(primary) is bool):
            raise TypeError("a Resource's type and id are text, its primary flag a bool")
        if key is not None and not isinstance(key, BusinessKey):
            raise TypeError("a Resource's key is a BusinessKey or None")
        if not isinstance(content, dict) or not isinstance(provenance, Provenance):
            raise TypeError("a Resource needs a content dict and a Provenance")
        self.resource_type = resource_type
        self.id = id
        self.primary = primary
        self.key = key
        self.content = content
        self.provenance = provenance

    def _values(self) -> tuple[Any, ...]:
        return (self.resource_type, self.id, self.primary, self.key, self.content,
                self.provenance)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Resource)
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # mutable: its content is a dict

    def __repr__(self) -> str:
        # Names and ids only: a record's content is PHI and must not reach a log.
        return f"Resource({self.resource_type}/{self.id}, primary={self.primary})"

    def __reduce_ex__(self, protocol: Any) -> Any:
        if type(self) is not Resource:  # a subclass's own slots: object's way keeps them
            return super().__reduce_ex__(protocol)
        return (trusted_resource, self._values())


def trusted_resource(resource_type: str, id: str, primary: bool,
                     key: BusinessKey | None, content: dict[str, Any],
                     provenance: Provenance) -> Resource:
    """A Resource from values known to be valid (the engine's, the wire form's): nothing
    checked, no __init__ run (a third of the cost of making one)."""
    resource = _new(Resource)
    resource.resource_type = resource_type
    resource.id = id
    resource.primary = primary
    resource.key = key
    resource.content = content
    resource.provenance = provenance
    return resource


class Translation:
    """Everything one source message says, and what of it was not mapped."""

    __slots__ = ("provenance", "resources", "unmapped", "z_segments")

    provenance: Provenance
    resources: list[Resource]
    unmapped: dict[str, int]  # location (PID-10, ZPI) -> occurrences; no values
    z_segments: int

    def __init__(self, provenance: Provenance, resources: list[Resource],
                 unmapped: dict[str, int] | None = None, z_segments: int = 0) -> None:
        if not isinstance(provenance, Provenance) or not isinstance(resources, list):
            raise TypeError("a Translation needs a Provenance and a list of Resources")
        self.provenance = provenance
        self.resources = resources
        self.unmapped = {} if unmapped is None else unmapped
        self.z_segments = z_segments

    @property
    def unmapped_count(self) -> int:
        return sum(self.unmapped.values())

    def _values(self) -> tuple[Any, ...]:
        return (self.provenance, self.resources, self.unmapped, self.z_segments)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Translation)
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (f"Translation({self.provenance.message_type} {len(self.resources)} "
                f"resources, {self.unmapped_count} unmapped)")

    def __reduce_ex__(self, protocol: Any) -> Any:
        if type(self) is not Translation:
            return super().__reduce_ex__(protocol)
        return (Translation, self._values())
