"""Outbound message definitions: which HL7 v2 message a FHIR resource becomes, and how.

    outbound.csv            resource [+ condition on its elements] -> message type and layout
    outbound/<NAME>.csv     the layout NAME (also MSH-9.3): segments in order, where each
                            one's resource comes from, and the segment table read backwards

Both are data (mappings/README.md, "FHIR R4 to HL7 v2"), checked at load: every problem is
reported as `file:line: reason` in one TableErrors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.fhir import model as fhir_model
from gateway.hl7.definitions import definitions
from gateway.mapping.conditions import ConditionError, compile_condition
from gateway.mapping.errors import TableError, TableErrors
from gateway.mapping.tables import (
    OUTBOUND_FILE,
    OUTBOUND_FOLDER,
    TableSet,
    Where,
    records,
    table_files,
)

OUTBOUND_COLUMNS = ("resource", "condition", "message_type", "layout", "default", "note")
LAYOUT_COLUMNS = ("segment", "source", "map", "set_id", "fixed", "note")
PLACEHOLDERS = ("{trigger}", "{now}", "{message_type}")

_MESSAGE_TYPE = re.compile(r"[A-Z0-9]{3}\^[A-Z0-9]{3}$")
_STRUCTURE = re.compile(r"[A-Z0-9]{3}_[A-Z0-9]{3}$")
_FIXED = re.compile(r"(\d+)=(.*)$", re.DOTALL)
COPY = re.compile(r"\{([A-Z][A-Z0-9]{2})-(\d+)\}")  # {RXA-3}: a copy of that field
_EACH = re.compile(r"([a-zA-Z]+)\[([a-zA-Z]+)=([A-Z][a-zA-Z]+)\]$")  # participant[actor=Location]

Predicate = Callable[[object], bool]


@dataclass(frozen=True, slots=True)
class SegmentLayout:
    """One row of a layout: a segment, made once per resource its source names."""

    where: Where
    segment: str
    source: tuple[str, ...]  # JSON keys from the message's resource to References; () = it
    from_resource: bool  # False: the segment is made once, from `fixed` only
    map: str  # the segment table read backwards ('' for none)
    resource_type: str  # what the map reads (the References followed are filtered by it)
    set_id: int  # the field numbered 1, 2, 3 ... over this row's segments (0: none)
    fixed: tuple[tuple[int, str], ...]  # field -> text, when the map left it empty
    # `participant[actor=Location]`: (list, reference key, type) -- one segment per element
    # of the resource's list whose reference there is to that type; None: not per element
    each: tuple[str, str, str] | None = None


@dataclass(frozen=True, slots=True)
class Outbound:
    """One row of outbound.csv, with its layout."""

    where: Where
    resource: str
    condition: Predicate | None
    message_type: str  # ADT^A31
    structure: str  # ADT_A05: the layout's name, MSH-9.3
    default: bool
    segments: tuple[SegmentLayout, ...]

    @property
    def trigger(self) -> str:
        return self.message_type.partition("^")[2]


def read_outbound(directory: Path, site: Path | None, tables: TableSet) -> list[Outbound]:
    """The outbound definitions (site files replacing shipped ones); TableErrors if bad."""
    files = table_files(directory, site)
    errors: list[TableError] = []
    layouts: dict[str, tuple[str, list[tuple[Where, dict[str, str]]]]] = {}
    for relative, path in sorted(files.items()):
        if relative.startswith(OUTBOUND_FOLDER + "/"):
            name = relative[len(OUTBOUND_FOLDER) + 1:-4]
            try:
                layouts[name] = (str(path), list(records(path, LAYOUT_COLUMNS)))
            except TableError as exc:
                errors.append(exc)
    rows: list[tuple[Where, dict[str, str]]] = []
    if OUTBOUND_FILE in files:
        try:
            rows = list(records(files[OUTBOUND_FILE], OUTBOUND_COLUMNS))
        except TableError as exc:
            errors.append(exc)
    checker = _Checker(tables, errors)
    out = [o for o in (checker.outbound(where, row, layouts) for where, row in rows) if o]
    for name, (file, layout_rows) in sorted(layouts.items()):
        if not _STRUCTURE.match(name):
            errors.append(TableError(file, 0, f"a layout is named after its message "
                                              f"structure (ADT_A05), not '{name}'"))
        if name not in checker.used:
            for where, row in layout_rows:  # still check a layout nothing uses yet
                checker.layout_row(where, row, None)
    if errors:
        raise TableErrors(errors)
    return out


class _Checker:
    def __init__(self, tables: TableSet, errors: list[TableError]) -> None:
        self.tables = tables
        self.errors = errors
        self.v2 = definitions("2.5.1")
        self.used: set[str] = set()
        self.seen: set[tuple[str, str]] = set()

    def outbound(self, where: Where, row: dict[str, str],
                 layouts: dict[str, tuple[str, list[tuple[Where, dict[str, str]]]]]
                 ) -> Outbound | None:
        before = len(self.errors)
        resource, message_type, layout = row["resource"], row["message_type"], row["layout"]
        if not fhir_model.is_resource_type(resource):
            self.errors.append(where.error(f"'{resource}' is not a FHIR R4 resource type"))
            return None
        if not _MESSAGE_TYPE.match(message_type):
            self.errors.append(where.error(
                f"message type '{message_type}' must look like ADT^A31"))
        elif (resource, message_type) in self.seen:
            self.errors.append(where.error(f"{resource} -> {message_type} is listed twice"))
        self.seen.add((resource, message_type))
        default = row["default"].strip().lower()
        if default not in ("", "yes", "no"):
            self.errors.append(where.error("default must be 'yes' or empty"))
        condition = self._condition(where, row["condition"], resource)
        if layout not in layouts:
            self.errors.append(where.error(f"unknown layout '{layout}' (no "
                                           f"{OUTBOUND_FOLDER}/{layout}.csv)"))
            return None
        self.used.add(layout)
        segments = [s for s in (self.layout_row(w, r, resource) for w, r in layouts[layout][1])
                    if s is not None]
        if len(self.errors) > before:
            return None
        return Outbound(where, resource, condition, message_type, layout, default == "yes",
                        tuple(segments))

    def _condition(self, where: Where, text: str, resource: str) -> Predicate | None:
        if not text:
            return None

        def getter_for(path: str) -> Callable[[object], str]:
            relative = path.split(".", 1)[1] if path.startswith(resource + ".") else path
            try:
                fhir_model.element(resource, relative)
            except fhir_model.UnknownElement as exc:
                raise ConditionError(f"'{path}': {exc}") from None
            keys = tuple(relative.split("."))

            def get(document: object) -> str:
                values = _values(document, keys)
                return _text(values[0]) if values else ""
            return get

        try:
            return compile_condition(text, getter_for)
        except ConditionError as exc:
            self.errors.append(where.error(f"condition: {exc}"))
            return None

    def layout_row(self, where: Where, row: dict[str, str], resource: str | None
                   ) -> SegmentLayout | None:
        before = len(self.errors)
        segment, source, name = row["segment"], row["source"], row["map"]
        if segment == "MSH":
            self.errors.append(where.error("MSH is built by the gateway; leave it out"))
        elif not (segment.startswith("Z") or segment in self.v2.segment_ids):
            self.errors.append(where.error(f"unknown HL7 v2 segment '{segment}'"))
        resource_type = ""
        if name:
            table = self.tables.segments.get(name)
            if table is None:
                self.errors.append(where.error(f"unknown segment map '{name}'"))
            else:
                resource_type = table.target_type
                if table.v2_type != segment:
                    self.errors.append(where.error(
                        f"map {name} reads {table.v2_type}, not {segment}"))
        elif source:
            self.errors.append(where.error("a row with a source needs a map"))
        keys: tuple[str, ...] = ()
        each = _EACH.match(source)
        if name and each is not None and resource is not None:
            self._each(where, resource, resource_type, name, each.groups())
        elif name and source not in ("", "this") and resource is not None:
            keys = tuple(source.split("."))
            try:
                element = fhir_model.element(resource, source)
            except fhir_model.UnknownElement as exc:
                self.errors.append(where.error(f"source '{source}': {exc}"))
            else:
                if element.type != "Reference":
                    self.errors.append(where.error(
                        f"source '{source}' is {element.type}, not a Reference"))
                elif element.reference_targets and resource_type and \
                        resource_type not in element.reference_targets and \
                        "Resource" not in element.reference_targets:
                    self.errors.append(where.error(
                        f"source '{source}' cannot refer to a {resource_type}"))
        elif name and source in ("", "this") and resource is not None and resource_type \
                and resource_type != resource:
            self.errors.append(where.error(
                f"map {name} reads a {resource_type}; name the source that refers to it"))
        set_id = 0
        if row["set_id"]:
            if not row["set_id"].isdigit() or not self._field_ok(segment, int(row["set_id"])):
                self.errors.append(where.error(f"set_id '{row['set_id']}' is not a field "
                                               f"of {segment}"))
            else:
                set_id = int(row["set_id"])
        fixed: list[tuple[int, str]] = []
        for part in filter(None, (p.strip() for p in row["fixed"].split(";"))):
            match = _FIXED.match(part)
            if match is None or not self._field_ok(segment, int(match.group(1))):
                self.errors.append(where.error(
                    f"fixed '{part}' must be <field number>=<text>, a field of {segment}"))
                continue
            text = match.group(2)
            copied = COPY.fullmatch(text)
            if copied is not None:  # {RXA-3}: the value of another field of this segment
                if copied.group(1) != segment or \
                        not self._field_ok(segment, int(copied.group(2))):
                    self.errors.append(where.error(
                        f"fixed '{part}': {text[1:-1]} is not a field of {segment}"))
                fixed.append((int(match.group(1)), text))
                continue
            for placeholder in re.findall(r"\{[^{}]*\}", text):
                if placeholder not in PLACEHOLDERS:
                    self.errors.append(where.error(
                        f"fixed '{part}': unknown {placeholder} (known: "
                        f"{', '.join(PLACEHOLDERS)})"))
            fixed.append((int(match.group(1)), text))
        if len(self.errors) > before:
            return None
        return SegmentLayout(where, segment, keys, bool(name), name, resource_type, set_id,
                             tuple(fixed),
                             (each.group(1), each.group(2), each.group(3)) if each else None)

    def _each(self, where: Where, resource: str, resource_type: str, name: str,
              parts: tuple[str, ...]) -> None:
        """`participant[actor=Location]`: the map reads the resource itself, the list is
        one of its elements, and the key inside it is a Reference that may be to the type."""
        items, key, target = parts
        if resource_type and resource_type != resource:
            self.errors.append(where.error(f"map {name} reads a {resource_type}, not the "
                                           f"{resource} whose {items} it is made from"))
            return
        try:
            element = fhir_model.element(resource, f"{items}.{key}")
        except fhir_model.UnknownElement as exc:
            self.errors.append(where.error(f"source '{items}[{key}={target}]': {exc}"))
            return
        if element.type != "Reference":
            self.errors.append(where.error(f"source '{items}.{key}' is {element.type}, "
                                           "not a Reference"))
        elif element.reference_targets and target not in element.reference_targets and \
                "Resource" not in element.reference_targets:
            self.errors.append(where.error(f"source '{items}.{key}' cannot refer to a "
                                           f"{target}"))

    def _field_ok(self, segment: str, number: int) -> bool:
        if segment.startswith("Z"):
            return number >= 1
        definition = self.v2.segments.get(segment)
        return definition is not None and definition.field(number) is not None


def _values(node: object, keys: tuple[str, ...]) -> list[Any]:
    nodes: list[Any] = [node]
    for key in keys:
        nxt: list[Any] = []
        for n in nodes:
            if isinstance(n, dict):
                value = n.get(key)
                if isinstance(value, list):
                    nxt.extend(value)
                elif value is not None:
                    nxt.append(value)
        nodes = nxt
    return nodes


def references(document: object, keys: tuple[str, ...]) -> list[Any]:
    """The Reference values at a path of JSON keys below a resource."""
    return _values(document, keys)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)
