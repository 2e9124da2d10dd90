"""Vendor normalisation: per-backend tables that absorb an EHR's quirks, so a client sees
one shape whichever EHR answered, and that declare what the EHR accepts beyond FHIR.

A table (`mappings/vendors/<name>.csv`, read and checked by `vendor_rows`) is a list of
rows. The answer rules rewrite, in row order, every resource a FHIR backend returns
(`apply`); `to_vendor` runs the system and code rules backwards over a request's token
search values, so a search with the canonical code finds the vendor's. The declarations
name the vendor's extra search parameters and operations, and the coding systems of its
error codes. Every row counts its hits (`hits`: row line -> count), so a row that never
matches anything is visible (`isthmus.vendor.rule_hits`, `isthmus mappings check
--against`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.forward.vendor_rows import (
    ANY,
    CONTACT_SYSTEMS,
    CONTACT_USES,
    RULE_TYPES,
    Rule,
    read_rules,
)
from gateway.mapping.errors import TableError

__all__ = ["ANY", "CONTACT_SYSTEMS", "CONTACT_USES", "FOLDER", "RULE_TYPES", "Normalizer",
           "Operation", "Rule", "load_vendor", "vendor_table"]

FOLDER = "vendors"

_NAME = re.compile(r"[a-z0-9_-]{1,32}")
# FHIR R4 search.html §3.1.1.5 (token): values are ORed by unescaped commas.
_VALUES = re.compile(r"(?<!\\),")

Json = dict[str, Any]
Pairs = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Operation:
    """An operation a vendor table declares: its level and the interaction whose scope
    it needs (read and search operations may be asked by GET too)."""

    resource: str
    name: str  # "$find"
    level: str  # "type" | "instance"
    interaction: str
    line: int

    @property
    def methods(self) -> tuple[str, ...]:
        return ("GET", "POST") if self.interaction in ("read", "search") else ("POST",)


class Normalizer:
    """The rows of one vendor table: applied to what that backend returns, run backwards
    over what is sent to it, and what it declares."""

    __slots__ = ("name", "rules", "hits", "_by_type", "_params", "_operations",
                 "_error_systems")

    def __init__(self, rules: Sequence[Rule] = (), name: str = "") -> None:
        self.name = name
        self.rules = tuple(rules)
        self.hits: dict[int, int] = {rule.line: 0 for rule in self.rules}
        self._by_type: dict[tuple[str, bool], tuple[Rule, ...]] = {}
        self._params: dict[str, dict[str, Rule]] = {}
        self._operations: dict[tuple[str, str, str], Rule] = {}
        self._error_systems: dict[str, Rule] = {}
        for rule in self.rules:
            if rule.rule == "search-param":
                self._params.setdefault(rule.resource, {})[rule.steps[0]] = rule
            elif rule.rule == "operation":
                self._operations[(rule.resource, rule.source, rule.steps[0])] = rule
            elif rule.rule == "error-code":
                self._error_systems.setdefault(rule.source, rule)

    @classmethod
    def load(cls, path: Path) -> Normalizer:
        """Read and check a table; TableError names the file, line and reason of a bad row."""
        return cls(read_rules(path), path.stem)

    def __bool__(self) -> bool:
        return bool(self.rules)

    # -- answers ---------------------------------------------------------------------------

    def apply(self, resource: Json, *, in_place: bool = False, repair: bool = False) -> Json:
        """A normalised copy (a Bundle's entries and contained resources too); the same
        object, changed, with `in_place` (a resource just parsed needs no copy).
        `repair`: the table's repairs (drop-empty) run too."""
        if not self.rules or not isinstance(resource, dict):
            return resource
        target = resource if in_place else copy.deepcopy(resource)
        self._apply(target, repair, self.hits)
        return target

    def hits_on(self, document: Json) -> dict[int, int]:
        """Which rows a payload (a resource or a Bundle) would hit, and how often; the
        payload is left alone and the table's own counts are not touched."""
        counts = {rule.line: 0 for rule in self.rules}
        if isinstance(document, dict):
            self._apply(copy.deepcopy(document), True, counts)
            entries = [e.get("resource") for e in _list(document.get("entry"))
                       if isinstance(e, dict)]
            for resource in (document, *entries):
                if isinstance(resource, dict) and (
                        resource.get("resourceType") == "OperationOutcome"):
                    self.error_codes(resource, counts)
        return counts

    def _apply(self, resource: Json, repair: bool, counts: dict[int, int]) -> None:
        resource_type = resource.get("resourceType")
        if not isinstance(resource_type, str):
            return
        for rule in self._rules_for(resource_type, repair):
            changed = _APPLY[rule.rule](rule, resource)
            if changed:
                counts[rule.line] = counts.get(rule.line, 0) + changed
        for contained in _list(resource.get("contained")):
            if isinstance(contained, dict):
                self._apply(contained, repair, counts)
        if resource_type == "Bundle":
            for entry in _list(resource.get("entry")):
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    self._apply(entry["resource"], repair, counts)

    def _rules_for(self, resource_type: str, repair: bool) -> tuple[Rule, ...]:
        key = (resource_type, repair)
        rules = self._by_type.get(key)
        if rules is None:
            rules = self._by_type[key] = tuple(
                r for r in self.rules if r.applies_to(resource_type) and r.rule in _APPLY
                and (repair or r.rule != "drop-empty"))
        return rules

    def repairs_made(self) -> int:
        """How many repairs (drop-empty) this table has made so far."""
        return sum(self.hits.get(r.line, 0) for r in self.rules if r.rule == "drop-empty")

    # -- refusals --------------------------------------------------------------------------

    def error_codes(self, outcome: Any, counts: dict[int, int] | None = None) -> list[Json]:
        """The vendor's own error codes in an OperationOutcome (system and code of the
        declared systems only: no display, no text, which may quote data)."""
        if not self._error_systems or not isinstance(outcome, dict):
            return []
        counts = self.hits if counts is None else counts
        found: list[Json] = []
        for issue in _list(outcome.get("issue")):
            details = issue.get("details") if isinstance(issue, dict) else None
            codings = details.get("coding") if isinstance(details, dict) else None
            for coding in _list(codings):
                if not isinstance(coding, dict):
                    continue
                system, code = coding.get("system"), coding.get("code")
                rule = self._error_systems.get(system) if isinstance(system, str) else None
                if rule is None or not isinstance(code, str) or not _CODE.fullmatch(code):
                    continue
                kept = {"system": system, "code": code}
                if kept not in found:
                    found.append(kept)
                    counts[rule.line] = counts.get(rule.line, 0) + 1
        return found

    # -- requests --------------------------------------------------------------------------

    def search_params(self, resource_type: str) -> Mapping[str, Rule]:
        """The vendor's own search parameters on this type, by name."""
        return self._params.get(resource_type, {})

    def declared_param(self, resource_type: str, name: str) -> bool:
        """Whether the table declares this parameter (its hit is counted)."""
        rule = self._params.get(resource_type, {}).get(name)
        if rule is None:
            return False
        self.hits[rule.line] += 1
        return True

    def operation(self, resource_type: str, name: str, level: str) -> Operation | None:
        rule = self._operations.get((resource_type, name, level))
        if rule is None:
            return None
        return Operation(resource_type, name, level, rule.target, rule.line)

    def operation_used(self, operation: Operation) -> None:
        self.hits[operation.line] = self.hits.get(operation.line, 0) + 1

    def to_vendor(self, resource_type: str, query: Sequence[tuple[str, str]],
                  roots: Callable[[str], frozenset[str]]) -> Pairs:
        """A request's token values in the vendor's systems and codes: each value one of
        the table's `to` sides names is replaced by every `from` side that maps to it
        (ORed). `roots(param)`: the top-level elements a parameter reads."""
        rules = [r for r in self._rules_for(resource_type, False) if r.rule in _BACKWARD]
        if not rules:
            return list(query)
        sent: Pairs = []
        for name, value in query:
            covered = roots(name) if ":" not in name else frozenset()
            mine = [r for r in rules if r.steps[0] in covered]
            if not mine:
                sent.append((name, value))
                continue
            values: list[str] = []
            for one in _VALUES.split(value):
                for translated in self._backward(mine, one):
                    if translated not in values:
                        values.append(translated)
            sent.append((name, ",".join(values)))
        return sent

    def _backward(self, rules: Sequence[Rule], value: str) -> list[str]:
        system, bar, code = value.rpartition("|")
        if not bar or not system:
            return [value]
        found: list[str] = []
        for rule in rules:
            if rule.rule == "code":
                to_system, to_code = rule.target.split("|")[:2]
                if (system, code) == (to_system, to_code):
                    found.append(rule.source)
                    self.hits[rule.line] += 1
            elif system == rule.target:
                found.append(f"{rule.source}|{code}")
                self.hits[rule.line] += 1
        return found or [value]

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


# Rules run backwards over a request's token values.
_BACKWARD = frozenset({"identifier-system", "coding-system", "code"})
# An error code as the vendor sends it (Epic's are digits: 4101, 59008).
_CODE = re.compile(r"[A-Za-z0-9._-]{1,64}")


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


def _identifier_system(rule: Rule, resource: Json) -> int:
    changed = 0
    for identifier in _nodes(resource, rule.steps):
        if identifier.get("system") == rule.source:
            identifier["system"] = rule.target
            changed += 1
    return changed


def _coding_system(rule: Rule, resource: Json) -> int:
    changed = 0
    for coding in _nodes(resource, rule.steps):
        if coding.get("system") == rule.source:
            coding["system"] = rule.target
            changed += 1
    return changed


def _code(rule: Rule, resource: Json) -> int:
    system, code = rule.source.split("|")
    to = rule.target.split("|")
    changed = 0
    for coding in _nodes(resource, rule.steps):
        if coding.get("system") == system and coding.get("code") == code:
            coding["system"], coding["code"] = to[0], to[1]
            if len(to) == 3 and to[2]:
                coding["display"] = to[2]
            changed += 1
    return changed


def _extension_to_telecom(rule: Rule, resource: Json) -> int:
    *parent_steps, field = rule.steps
    changed = 0
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
        changed += len(moved)
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
    return changed


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


def _drop_extension(rule: Rule, resource: Json) -> int:
    *parent_steps, field = rule.steps
    changed = 0
    for parent in _nodes(resource, parent_steps):
        extensions = parent.get(field)
        if not isinstance(extensions, list):
            continue
        kept = [e for e in extensions
                if not (isinstance(e, dict) and e.get("url") == rule.source)]
        if len(kept) == len(extensions):
            continue
        changed += len(extensions) - len(kept)
        if kept:
            parent[field] = kept
        else:
            del parent[field]
    return changed


def _telecom_use(rule: Rule, resource: Json) -> int:
    changed = 0
    for contact in _nodes(resource, rule.steps):
        if contact.get("use") == rule.source:
            contact["use"] = rule.target
            changed += 1
    return changed


def _drop_empty(rule: Rule, resource: Json) -> int:
    """FHIR R4 §2.1.0.3 (json.html): an element has a value or children; "" is neither.
    Empty strings at the path (anywhere without one) go, then what they leave empty."""
    if not rule.steps:
        return _prune(resource)
    *parent_steps, field = rule.steps
    changed = 0
    for parent in _nodes(resource, parent_steps):
        value = parent.get(field)
        if value == "" or value == [] or value == {}:
            del parent[field]
            changed += 1
        elif isinstance(value, list):
            kept = [item for item in value if item not in ("", [], {})]
            changed += len(value) - len(kept)
            if kept:
                parent[field] = kept
            else:
                del parent[field]
    if changed:
        _prune(resource)
    return changed


def _prune(node: Any) -> int:
    """Remove empty strings, and the objects and lists left empty, below `node`."""
    removed = 0
    if isinstance(node, dict):
        for key in list(node):
            removed += _prune(node[key])
            if node[key] in ("", [], {}):
                del node[key]
                removed += 1
    elif isinstance(node, list):
        for item in node:
            removed += _prune(item)
        before = len(node)
        node[:] = [item for item in node if item not in ("", [], {})]
        removed += before - len(node)
    return removed


_APPLY: dict[str, Callable[[Rule, Json], int]] = {
    "identifier-system": _identifier_system,
    "coding-system": _coding_system,
    "code": _code,
    "extension-to-telecom": _extension_to_telecom,
    "drop-extension": _drop_extension,
    "telecom-use": _telecom_use,
    "drop-empty": _drop_empty,
}
