"""Pydantic models of what crosses the gateway, each carrying its provenance.

A `Resource` is one clinical or administrative record (a Patient, an Encounter, an
Observation ...) whose content uses FHIR R4 element names, so that every consumer reads one
vocabulary; what makes it canonical rather than FHIR is that it says where it came from
(the source system, the control id, when it was received and last changed) and which
business identifier makes it the same record next time. The models know nothing of HL7
or FHIR wire formats: the mapping layer fills them, codecs write them out.

The engine builds these with `trusted()` (its compiled tables guarantee the shape; it is
`model_construct` without the per-call bookkeeping, which cost ~10% of a translation);
`model_validate` is there for input that did not come from the engine.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

M = TypeVar("M", bound=BaseModel)


_new = object.__new__
# The instance's __dict__ and BaseModel's own slots, written through their descriptors
# (a little faster than object.__setattr__, which looks each one up by name).
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


def trusted(cls: type[M], **values: Any) -> M:
    """An instance from values known to be valid: every field given, nothing checked."""
    return _made(cls, values, set(values))


def trusted_full(cls: type[M], values: dict[str, Any]) -> M:
    """`trusted(cls, **values)` for values naming every field of `cls`, with the one
    fields set all of them share (as `trusted_resource`'s: no set made a call)."""
    fields_set = _FULL_FIELDS.get(cls)
    if fields_set is None:
        fields_set = _FULL_FIELDS[cls] = set(cls.model_fields)
    return _made(cls, values, fields_set)


def _made(cls: type[M], values: dict[str, Any], fields_set: set[str]) -> M:
    """An instance holding `values` as they are (also what `_Record` unpickles)."""
    instance = _new(cls)
    _set_dict(instance, values)
    _set_fields_set(instance, fields_set)
    _set_extra(instance, None)
    _set_private(instance, None)
    return instance


def trusted_resource(resource_type: str, id: str, primary: bool, key: BusinessKey | None,
                     content: dict[str, Any], provenance: Provenance) -> Resource:
    """`trusted(Resource, ...)` without the keyword dict and its set of names: the engine
    makes one per resource of every message (an ADT^A01 has 16), so `_made` is written
    out here rather than called."""
    instance = _new(Resource)
    _set_dict(instance, {"resource_type": resource_type, "id": id, "primary": primary,
                         "key": key, "content": content, "provenance": provenance})
    _set_fields_set(instance, _RESOURCE_FIELDS)
    _set_extra(instance, None)
    _set_private(instance, None)
    return instance


def trusted_key(system: str, value: str) -> BusinessKey:
    """`trusted(BusinessKey, system=..., value=...)`, as `trusted_resource` is for Resource."""
    instance = _new(BusinessKey)
    _set_dict(instance, {"system": system, "value": value})
    _set_fields_set(instance, _KEY_FIELDS)
    _set_extra(instance, None)
    _set_private(instance, None)
    return instance


class _Record(BaseModel):
    """A model pickled as its field values: a translation made for an ACK crosses to the
    apply worker pickled, and BaseModel's own pickling (a state dict per model, set again
    attribute by attribute) cost the translator ~100 us and the worker ~130 us an ADT^A01
    (19 resources); this form ~75 and ~105 (bench/README.md, the ACK's translate wait)."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self.__pydantic_extra__ is not None or self.__pydantic_private__ is not None:
            return super().__reduce_ex__(protocol)  # not one the engine makes
        return (_made, (type(self), self.__dict__, self.__pydantic_fields_set__))


class Provenance(_Record):
    """Where a record came from."""

    model_config = ConfigDict(frozen=True)

    source_application: str = Field(description="MSH-3, or the FHIR client id")
    source_facility: str = Field(description="MSH-4")
    control_id: str = Field(description="MSH-10: the source message")
    message_type: str = Field(description="ADT^A01, ORU^R01 ...")
    received_at: datetime
    last_updated: datetime


class BusinessKey(_Record):
    """The identifier that makes a record the same record across messages."""

    model_config = ConfigDict(frozen=True)

    system: str = ""
    value: str


class Resource(_Record):
    """One record. `content` holds its elements by FHIR R4 name (no id, no meta)."""

    resource_type: str
    id: str = Field(description="deterministic: the same source gives the same id")
    primary: bool = Field(description="made from a segment (True) or only referred to")
    key: BusinessKey | None = None
    content: dict[str, Any]
    provenance: Provenance


class Translation(_Record):
    """Everything one source message says, and what of it was not mapped."""

    provenance: Provenance
    resources: list[Resource]
    unmapped: dict[str, int] = Field(
        default_factory=dict, description="location (PID-10, ZPI) -> occurrences; no values")
    z_segments: int = 0

    @property
    def unmapped_count(self) -> int:
        return sum(self.unmapped.values())


# Every field of a Resource: the fields set `trusted_resource` gives, one set shared by all
# (a copy each cost ~800 instructions a resource). Pydantic adds to a fields set only a
# name assigned: a Resource's is a field, already in it (extra names are refused), and
# `model_copy` copies the set before adding. Do not add to a Resource's fields set.
_RESOURCE_FIELDS = set(Resource.model_fields)
# A BusinessKey's: one set shared by all the engine makes, as `_RESOURCE_FIELDS` (the model
# is frozen: no assignment adds to it).
_KEY_FIELDS = {"system", "value"}
# A model's fields -> the fields set `trusted_full` gives its instances (the same reasoning
# as `_RESOURCE_FIELDS`: an assignment only adds a field's name, already in it).
_FULL_FIELDS: dict[type[BaseModel], set[str]] = {}
