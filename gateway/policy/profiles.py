"""Minimum-necessary task profiles: which resource types, and which of their top-level
elements, a client's task may see.

A profile is plain config (profile -> resource type -> element names, or ["*"] for the
whole resource), checked against the FHIR R4 model once at start-up; filtering then costs
one set lookup per element.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from gateway.fhir.model import is_resource_type, required_elements

# ProfileDenied, ProfileError: defined in errors.py; imported here too for the old import path.
from gateway.policy.errors import ProfileDenied as ProfileDenied
from gateway.policy.errors import ProfileError as ProfileError

WHOLE = "*"
SUBSETTED_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
SUBSETTED_CODE = "SUBSETTED"
_SUBSETTED_TAG = {"system": SUBSETTED_SYSTEM, "code": SUBSETTED_CODE}
# Served whatever the profile says: without them the resource is not a resource.
_ALWAYS = frozenset({"resourceType", "id", "meta"})
# Search parameters every profile may use: they read only id and meta.lastUpdated.
_ALWAYS_SEARCH = frozenset({"_id", "_lastUpdated"})


@dataclass(frozen=True, slots=True)
class _TypeElements:
    """What the R4 model says about one resource type's top-level elements."""

    names: frozenset[str]  # every JSON element name ('birthDate', 'valueQuantity', ...)
    choices: Mapping[str, frozenset[str]]  # choice base name -> its JSON names
    required: frozenset[str]  # min cardinality 1 (every variant of a required choice)


@cache
def _type_elements(resource_type: str) -> _TypeElements:
    model = get_fhir_model_class(resource_type)
    names: set[str] = set()
    choices: dict[str, set[str]] = {}
    for field_name, field in model.model_fields.items():
        name = field.alias or field_name
        if field_name.endswith("__ext") or field_name == "fhir_comments":
            continue  # '_birthDate' siblings follow their element; comments are not data
        names.add(name)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        base = extra.get("one_of_many")
        if isinstance(base, str):
            choices.setdefault(base, set()).add(name)
    return _TypeElements(frozenset(names),
                         {base: frozenset(v) for base, v in choices.items()},
                         required_elements(resource_type))


def _with_siblings(names: frozenset[str]) -> frozenset[str]:
    """Add each element's '_name' sibling (a primitive's id and extensions)."""
    return names | {"_" + name for name in names}


class Profile:
    """One task profile: the resource types it may read and their visible elements."""

    __slots__ = ("name", "elements", "_visible", "_choices")

    def __init__(self, name: str, types: Mapping[str, Sequence[str]]) -> None:
        """Check every type and element name against the R4 model (ProfileError if not)."""
        self.name = name
        # Per type: the configured element names, or None for the whole resource.
        self.elements: dict[str, frozenset[str] | None] = {}
        self._visible: dict[str, frozenset[str]] = {}
        self._choices: dict[str, Mapping[str, frozenset[str]]] = {}
        for resource_type, listed in types.items():
            self._add_type(resource_type, listed)

    def _add_type(self, resource_type: str, listed: Sequence[str]) -> None:
        if not isinstance(resource_type, str) or not is_resource_type(resource_type):
            raise ProfileError(self.name, str(resource_type), None,
                               "not a FHIR R4 resource type")
        if isinstance(listed, str) or not all(isinstance(e, str) for e in listed):
            raise ProfileError(self.name, resource_type, None,
                               "expected a list of element names")
        if WHOLE in listed:
            if len(listed) != 1:
                raise ProfileError(self.name, resource_type, WHOLE,
                                   "'*' (the whole resource) must stand alone")
            self.elements[resource_type] = None
            return
        model = _type_elements(resource_type)
        visible: set[str] = set(_ALWAYS | model.required)
        for element in listed:
            if element in model.names or element in _ALWAYS:
                visible.add(element)
            elif element in model.choices:
                visible |= model.choices[element]
            else:
                raise ProfileError(self.name, resource_type, element,
                                   "not a top-level element of this type in FHIR R4")
        self.elements[resource_type] = frozenset(listed)
        self._visible[resource_type] = _with_siblings(frozenset(visible))
        self._choices[resource_type] = model.choices

    @property
    def purpose_of_use(self) -> str:
        """Recorded as the purpose of use of every access made under this profile."""
        return self.name

    def allows_type(self, resource_type: str) -> bool:
        return resource_type in self.elements

    def is_whole(self, resource_type: str) -> bool:
        """The whole resource is visible: serve stored bytes without parsing them."""
        return resource_type in self.elements and self.elements[resource_type] is None

    def filter(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Only the visible top-level elements (plus required ones), tagged SUBSETTED if
        anything was removed; the same object when the whole type is visible.

        Contained resources travel inside `contained` and are not filtered separately;
        a Bundle's entries are filtered one by one by the caller.
        """
        resource_type = resource.get("resourceType")
        if not isinstance(resource_type, str) or resource_type not in self.elements:
            raise ProfileDenied(self.name, str(resource_type))
        visible = self._visible.get(resource_type)
        if visible is None:
            return resource
        kept = {key: value for key, value in resource.items() if key in visible}
        if len(kept) != len(resource):
            kept["meta"] = tag_subsetted(kept.get("meta"))
        return kept

    def permits_search(self, resource_type: str, element_roots: frozenset[str]) -> bool:
        """A search parameter reading these top-level elements may be used: it must not
        reveal, by matching, what the profile hides."""
        if resource_type not in self.elements:
            return False
        visible = self._visible.get(resource_type)
        if visible is None:
            return True
        choices = self._choices[resource_type]
        for root in element_roots:
            root = root.split(".", 1)[0]
            if root in visible or root in _ALWAYS_SEARCH:
                continue
            # A choice base ('value') is visible only if all its variants are.
            variants = choices.get(root)
            if variants is None or not variants <= visible:
                return False
        return True

    def __repr__(self) -> str:
        return f"Profile({self.name!r}, types={sorted(self.elements)!r})"


def tag_subsetted(meta: Any) -> dict[str, Any]:
    """A copy of meta with the SUBSETTED tag added once (the input is not modified): for a
    profile's cut and for `_elements` alike."""
    copy: dict[str, Any] = dict(meta) if isinstance(meta, dict) else {}
    existing = copy.get("tag")
    tags: list[Any] = list(existing) if isinstance(existing, list) else []
    if not any(isinstance(t, dict) and t.get("system") == SUBSETTED_SYSTEM
               and t.get("code") == SUBSETTED_CODE for t in tags):
        tags.append(dict(_SUBSETTED_TAG))
    copy["tag"] = tags
    return copy


def load_profiles(config: Mapping[str, Mapping[str, Sequence[str]]]) -> dict[str, Profile]:
    """Build and check every profile of the config (ProfileError names the first bad one)."""
    return {name: Profile(name, types) for name, types in config.items()}
