"""Vendor normalisation: per-backend tables that absorb an EHR's quirks, so a client sees
one shape whichever EHR answered.

A table (`mappings/vendors/<name>.csv`, columns `resource,rule,path,from,to,note`) is a
list of small rewrites applied, in row order, to every resource a FHIR backend returns.
`path` names elements of the rule's type (in brackets):

- identifier-system (Identifier): `system` `from` becomes `to`;
- coding-system (Coding): `system` `from` becomes `to`;
- code (Coding): `from` = system|code becomes `to` = system|code[|display];
- extension-to-telecom (ContactPoint): an extension with url `from` on the element that
  holds `path` (valueString or valueContactPoint) becomes a ContactPoint with system
  `to`, and is removed;
- drop-extension (Extension): extensions with url `from` are removed;
- telecom-use (ContactPoint): `use` `from` becomes `to`.

`resource` is a FHIR type or `*`. Rows are checked when the table is loaded (a path of a
named type against the R4 model); a bad row stops the start with `file:line: reason`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.fhir.model import UnknownElement, element, is_resource_type
from gateway.mapping.errors import TableError
from gateway.mapping.tables import Where, records

COLUMNS = ("resource", "rule", "path", "from", "to", "note")
FOLDER = "vendors"
ANY = "*"

# The FHIR type of the elements each rule's path names.
RULE_TYPES = {
    "identifier-system": "Identifier",
    "coding-system": "Coding",
    "code": "Coding",
    "extension-to-telecom": "ContactPoint",
    "drop-extension": "Extension",
    "telecom-use": "ContactPoint",
}
# FHIR R4 ContactPoint.system and ContactPoint.use (required bindings).
CONTACT_SYSTEMS = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})
CONTACT_USES = frozenset({"home", "work", "temp", "old", "mobile"})

_NAME = re.compile(r"[a-z0-9_-]{1,32}")
_STEP = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_URI = re.compile(r"\S+")

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of a vendor table, checked."""

    where: Where
    resource: str
    rule: str
    steps: tuple[str, ...]
    source: str  # the `from` column
    target: str  # the `to` column

    def applies_to(self, resource_type: str) -> bool:
        return self.resource in (ANY, resource_type)


class Normalizer:
    """The rules of one vendor table, applied to what that backend returns."""

    __slots__ = ("name", "rules", "_by_type")

    def __init__(self, rules: Sequence[Rule] = (), name: str = "") -> None:
        self.name = name
        self.rules = tuple(rules)
        self._by_type: dict[str, tuple[Rule, ...]] = {}

    @classmethod
    def load(cls, path: Path) -> Normalizer:
        """Read and check a table; TableError names the file, line and reason of a bad row."""
        rules: list[Rule] = []
        seen: dict[tuple[str, str, tuple[str, ...], str], int] = {}
        for where, row in records(path, COLUMNS):
            rule = _rule(where, row)
            key = (rule.resource, rule.rule, rule.steps, rule.source)
            if key in seen:
                raise where.error(f"repeats the rule of line {seen[key]}")
            seen[key] = where.line
            rules.append(rule)
        return cls(rules, path.stem)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def apply(self, resource: Json, *, in_place: bool = False) -> Json:
        """A normalised copy (a Bundle's entries and contained resources too); the same
        object, changed, with `in_place` (a resource just parsed needs no copy)."""
        if not self.rules or not isinstance(resource, dict):
            return resource
        target = resource if in_place else copy.deepcopy(resource)
        self._apply(target)
        return target

    def _apply(self, resource: Json) -> None:
        resource_type = resource.get("resourceType")
        if not isinstance(resource_type, str):
            return
        for rule in self._rules_for(resource_type):
            _APPLY[rule.rule](rule, resource)
        for contained in _list(resource.get("contained")):
            if isinstance(contained, dict):
                self._apply(contained)
        if resource_type == "Bundle":
            for entry in _list(resource.get("entry")):
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    self._apply(entry["resource"])

    def _rules_for(self, resource_type: str) -> tuple[Rule, ...]:
        rules = self._by_type.get(resource_type)
        if rules is None:
            rules = self._by_type[resource_type] = tuple(
                r for r in self.rules if r.applies_to(resource_type))
        return rules

    def __repr__(self) -> str:
        return f"Normalizer({self.name!r}, rules={len(self.rules)})"


def vendor_table(name: str, shipped_dir: Path, site_dir: Path | None = None) -> Path:
    """The file of vendor table `name`: the site's copy if it has one, else the shipped."""
    if not _NAME.fullmatch(name):
        raise TableError(f"{FOLDER}/{name}.csv", 0, "a vendor table name is 1-32 of a-z 0-9 "
                                                    "_ -")
    if site_dir is not None:
        site = site_dir / FOLDER / f"{name}.csv"
        if site.is_file():
            return site
    return shipped_dir / FOLDER / f"{name}.csv"


def load_vendor(name: str, shipped_dir: Path, site_dir: Path | None = None) -> Normalizer:
    """Vendor table `name` (e.g. "epic"), the site's copy winning over the shipped one."""
    path = vendor_table(name, shipped_dir, site_dir)
    if not path.is_file():
        raise TableError(path, 0, f"no vendor table '{name}' (looked in "
                                  f"{FOLDER}/ of the shipped and site tables)")
    return Normalizer.load(path)


# -- checking a row ---------------------------------------------------------------------------


def _rule(where: Where, row: dict[str, str]) -> Rule:
    resource, kind, path = row["resource"], row["rule"], row["path"]
    source, target = row["from"], row["to"]
    if kind not in RULE_TYPES:
        raise where.error(f"rule '{kind}' is not one of {', '.join(RULE_TYPES)}")
    if resource != ANY and not is_resource_type(resource):
        raise where.error(f"resource '{resource}' is not a FHIR R4 resource type or *")
    steps = tuple(path.split(".")) if path else ()
    if not steps or not all(_STEP.fullmatch(s) for s in steps):
        raise where.error("path must name elements, e.g. identifier or code.coding")
    if resource != ANY:
        _check_path(where, resource, path, RULE_TYPES[kind])
    elif kind == "drop-extension" and steps[-1] != "extension":
        raise where.error("a drop-extension path ends in 'extension'")
    if not source:
        raise where.error("'from' is empty")
    if kind == "drop-extension":
        if target:
            raise where.error("drop-extension takes no 'to'")
    elif not target:
        raise where.error("'to' is empty")
    if kind in ("identifier-system", "coding-system", "extension-to-telecom",
                "drop-extension") and not _URI.fullmatch(source):
        raise where.error("'from' must be a URI without spaces")
    if kind in ("identifier-system", "coding-system") and not _URI.fullmatch(target):
        raise where.error("'to' must be a URI without spaces")
    if kind == "code":
        _check_coding(where, "from", source, 2)
        _check_coding(where, "to", target, 3)
    if kind == "extension-to-telecom" and target not in CONTACT_SYSTEMS:
        raise where.error("'to' must be a ContactPoint.system: "
                          + "|".join(sorted(CONTACT_SYSTEMS)))
    if kind == "telecom-use" and target not in CONTACT_USES:
        raise where.error("'to' must be a ContactPoint.use: " + "|".join(sorted(CONTACT_USES)))
    return Rule(where, resource, kind, steps, source, target)


def _check_path(where: Where, resource: str, path: str, wanted: str) -> None:
    try:
        found = element(resource, path).type
    except UnknownElement as exc:
        raise where.error(f"path '{path}' of {resource}: {exc}") from None
    if found != wanted:
        raise where.error(f"path '{path}' of {resource} is a {found}; this rule needs "
                          f"{wanted} elements")


def _check_coding(where: Where, column: str, text: str, max_parts: int) -> None:
    parts = text.split("|")
    if not 2 <= len(parts) <= max_parts or not parts[0] or not parts[1]:
        shape = "system|code" if max_parts == 2 else "system|code or system|code|display"
        raise where.error(f"'{column}' must be {shape}")


# -- applying a rule --------------------------------------------------------------------------


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _nodes(value: Any, steps: Sequence[str]) -> Iterator[Json]:
    """The objects at a path below `value`, repetitions flattened."""
    if isinstance(value, list):
        for item in value:
            yield from _nodes(item, steps)
        return
    if not isinstance(value, dict):
        return
    if not steps:
        yield value
        return
    yield from _nodes(value.get(steps[0]), steps[1:])


def _identifier_system(rule: Rule, resource: Json) -> None:
    for identifier in _nodes(resource, rule.steps):
        if identifier.get("system") == rule.source:
            identifier["system"] = rule.target


def _coding_system(rule: Rule, resource: Json) -> None:
    for coding in _nodes(resource, rule.steps):
        if coding.get("system") == rule.source:
            coding["system"] = rule.target


def _code(rule: Rule, resource: Json) -> None:
    system, code = rule.source.split("|")
    to = rule.target.split("|")
    for coding in _nodes(resource, rule.steps):
        if coding.get("system") == system and coding.get("code") == code:
            coding["system"], coding["code"] = to[0], to[1]
            if len(to) == 3 and to[2]:
                coding["display"] = to[2]


def _extension_to_telecom(rule: Rule, resource: Json) -> None:
    *parent_steps, field = rule.steps
    for parent in _nodes(resource, parent_steps):
        extensions = parent.get("extension")
        if not isinstance(extensions, list):
            continue
        kept: list[Any] = []
        moved: list[Json] = []
        for extension in extensions:
            contact = _contact(extension, rule) if isinstance(extension, dict) else None
            if contact is None:
                kept.append(extension)
            else:
                moved.append(contact)
        if not moved:
            continue
        if kept:
            parent["extension"] = kept
        else:
            del parent["extension"]
        telecom = parent.get(field)
        existing = telecom if isinstance(telecom, list) else []
        for contact in moved:
            if not any(isinstance(c, dict) and c.get("system") == contact.get("system")
                       and c.get("value") == contact.get("value") for c in existing):
                existing.append(contact)
        parent[field] = existing


def _contact(extension: Json, rule: Rule) -> Json | None:
    """The ContactPoint an extension holds, if it is the rule's extension with a value."""
    if extension.get("url") != rule.source:
        return None
    if isinstance(extension.get("valueString"), str) and extension["valueString"]:
        return {"system": rule.target, "value": extension["valueString"]}
    value = extension.get("valueContactPoint")
    if isinstance(value, dict) and value.get("value"):
        return {**value, "system": rule.target}
    return None


def _drop_extension(rule: Rule, resource: Json) -> None:
    *parent_steps, field = rule.steps
    for parent in _nodes(resource, parent_steps):
        extensions = parent.get(field)
        if not isinstance(extensions, list):
            continue
        kept = [e for e in extensions
                if not (isinstance(e, dict) and e.get("url") == rule.source)]
        if len(kept) == len(extensions):
            continue
        if kept:
            parent[field] = kept
        else:
            del parent[field]


def _telecom_use(rule: Rule, resource: Json) -> None:
    for contact in _nodes(resource, rule.steps):
        if contact.get("use") == rule.source:
            contact["use"] = rule.target


_APPLY: dict[str, Callable[[Rule, Json], None]] = {
    "identifier-system": _identifier_system,
    "coding-system": _coding_system,
    "code": _code,
    "extension-to-telecom": _extension_to_telecom,
    "drop-extension": _drop_extension,
    "telecom-use": _telecom_use,
}
