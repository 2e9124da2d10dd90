"""The FHIR search parameter table: rows of `mappings/search-parameters.csv`, checked against
the R4 model and compiled once into per-type extractors, so indexing stays cheap.

A bad row raises SearchTableError naming the file, the line and the rule.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast, get_args

from gateway.fhir.errors import SearchTableError, UnknownElement
from gateway.fhir.model import element, is_resource_type
from gateway.fhir.search.index import IndexPath, Step, emitter

# The table's file name in the mappings directory; the composition passes
# `gateway.mapping.tables.SHIPPED / TABLE` (a codec may not import the mapping layer).
TABLE = "search-parameters.csv"
COLUMNS = ("resource", "name", "type", "path", "targets", "compartment")

ParamType = Literal["token", "string", "date", "reference", "quantity"]
PARAM_TYPES: tuple[str, ...] = get_args(ParamType)

_PARAM_NAME = re.compile(r"[a-z][a-z0-9\-]*")
_STEP = re.compile(r"([A-Za-z][A-Za-z0-9]*)(?:\[([A-Za-z][A-Za-z0-9]*)=([^\]]+)\])?")


@dataclass(frozen=True, slots=True)
class SearchParameter:
    """One row of the table: a parameter of one resource type, compiled."""

    resource: str
    name: str
    type: ParamType
    path: str  # as written in the table, e.g. 'effectiveDateTime|effectivePeriod'
    targets: tuple[str, ...]  # reference target types
    compartment: bool  # places the resource in the Patient compartment
    roots: frozenset[str]  # the top-level elements the parameter reads
    contact: bool = False  # reads ContactPoint values: normalise search values alike
    # Names the patient the resource is about (subject, patient, beneficiary), not one who
    # only took part (performer, asserter, author): what a confined client's write may name.
    subject: bool = False
    paths: tuple[IndexPath, ...] = field(default=(), repr=False, compare=False)


def read_table(path: Path) -> list[SearchParameter]:
    """Read and check the table; SearchTableError names the file and line of a bad row."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SearchTableError(path, 0, f"cannot be read: {exc}") from None
    reader = csv.reader(text.splitlines(keepends=True))
    header = [h.strip() for h in next(reader, [])]
    if sorted(header) != sorted(COLUMNS):
        raise SearchTableError(path, 1, "header must be " + ",".join(COLUMNS))
    seen: set[tuple[str, str]] = set()
    parameters: list[SearchParameter] = []
    for cells in reader:
        line = reader.line_num
        if not cells or all(not c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        if len(cells) != len(header):
            raise SearchTableError(path, line, f"has {len(cells)} cells; the header has "
                                               f"{len(header)}")
        row = {h: c.strip() for h, c in zip(header, cells, strict=True)}
        try:
            param = _compile(row)
        except (ValueError, UnknownElement) as exc:
            raise SearchTableError(path, line, str(exc)) from None
        if (param.resource, param.name) in seen:
            raise SearchTableError(path, line, f"{param.resource} {param.name} is defined "
                                               "twice")
        seen.add((param.resource, param.name))
        parameters.append(param)
    return parameters


def _compile(row: dict[str, str]) -> SearchParameter:
    resource, name, kind = row["resource"], row["name"], row["type"]
    if not is_resource_type(resource):
        raise ValueError(f"resource '{resource}' is not a FHIR R4 resource type")
    if name in ("_id", "_lastUpdated"):
        raise ValueError(f"{name} is built in; it needs no row")
    if not _PARAM_NAME.fullmatch(name):
        raise ValueError(f"name '{name}': lower-case letters, digits and '-'")
    if kind not in PARAM_TYPES:
        raise ValueError(f"type '{kind}' is not one of {'|'.join(PARAM_TYPES)}")
    targets = tuple(t for t in row["targets"].split("|") if t)
    if kind == "reference" and not targets:
        raise ValueError("a reference parameter lists its target types")
    if kind != "reference" and targets:
        raise ValueError("targets are for reference parameters only")
    if row["compartment"] not in ("", "0", "1", "subject"):
        raise ValueError("compartment is 1, 0 or empty, or subject (1, and the resource "
                         "is about the patient it names)")
    compartment = row["compartment"] in ("1", "subject")
    if compartment and "Patient" not in targets:
        raise ValueError("only a reference that may point to a Patient places a resource in "
                         "the Patient compartment")
    if not row["path"]:
        raise ValueError("path is empty")
    paths: list[IndexPath] = []
    leaf_types: set[str] = set()
    for alternative in row["path"].split("|"):
        steps = _steps(resource, alternative)
        leaf = element(resource, ".".join(s.name for s in steps))
        leaf_types.add(leaf.type)
        for target in targets:
            if leaf.reference_targets and target not in leaf.reference_targets:
                raise ValueError(f"{resource}.{alternative} cannot refer to a {target}")
        paths.append(IndexPath(steps, emitter(kind, leaf.type, alternative, targets)))
    return SearchParameter(
        resource=resource, name=name, type=cast(ParamType, kind),
        path=row["path"], targets=targets, compartment=compartment,
        subject=row["compartment"] == "subject",
        roots=frozenset(p.steps[0].name for p in paths),
        contact=leaf_types == {"ContactPoint"}, paths=tuple(paths))


def _steps(resource: str, path: str) -> tuple[Step, ...]:
    steps: list[Step] = []
    for text in path.split("."):
        match = _STEP.fullmatch(text)
        if match is None:
            raise ValueError(f"'{text}' in path '{path}' is not an element name or "
                             "element[child=value]")
        name, key, want = match.groups()
        steps.append(Step(name, (key, want) if key else None))
        if key:  # the filtering child must exist on the element
            element(resource, ".".join([*(s.name for s in steps), key]))
    return tuple(steps)


def string_groups(params: Iterable[SearchParameter]) -> tuple[frozenset[str], ...]:
    """One type's string parameters grouped by the element they read: a parameter each of
    whose paths lies under a path of another (`name.family` under `name`) joins that one's
    group, transitively. Only groups of two or more. A search for one parameter of a
    group of n looks up 2 ** (n - 1) labels (the sets of the group that hold it): 16 for
    Patient's five `address` parameters, one index search each."""
    strings = [p for p in params if p.type == "string"]
    group = {p.name: p.name for p in strings}

    def root(name: str) -> str:
        while group[name] != name:
            name = group[name]
        return name

    for child in strings:
        for parent in strings:
            if parent is not child and all(
                    any(len(c.steps) > len(a.steps) and c.steps[:len(a.steps)] == a.steps
                        for a in parent.paths) for c in child.paths):
                group[root(child.name)] = root(parent.name)
    members: dict[str, set[str]] = {}
    for name in group:
        members.setdefault(root(name), set()).add(name)
    return tuple(sorted((frozenset(m) for m in members.values()
                         if len(m) > 1), key=sorted))
