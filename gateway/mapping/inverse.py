"""Segment and data-type tables read backwards: FHIR elements -> HL7 v2 positions.

The forward compiler (compiler.py) turns each row into "read v2 here, write FHIR there";
this module turns the reversible rows of the same tables into "read FHIR there, write v2
here", once, at load. What a row does backwards:

- a row with a source and a target and no value: read the target, convert it back
  (dates keep precision and offset, booleans become Y/N, a vocabulary is looked up in
  reverse, a data-type map is inverted recursively) and write it at the source;
- a row whose value is a template quoting this table's own locations (`urn:oid:{HD.2}`,
  `{XTN.6} {XTN.7}`) is inverted when the FHIR value matches the template's literal text;
- a constant row is never written back: its value decides which rows a FHIR element
  belongs to (PID-19 takes the identifier whose system is the SSN one);
- a condition is checked against what was written (`PID-7 LENGTH GREATER THAN 8`), and a
  plain `X EQUALS "c"` / `X IN ("c", ...)` on an empty location is satisfied by writing
  `c` there (`HD.3 EQUALS "ISO"`).

Rows that cannot be read backwards are skipped and listed (`Inverter.skipped`): rows reading
another segment (`MSH-9.2`), conditions or templates naming another segment.

Where several rows could produce one FHIR element the candidates are ranked: a row whose v2
value is already written (nothing new), a template or vocabulary that recognises the value,
constants of the row's group that agree with the FHIR data, fewer invented values, an
unconditional row, then table order.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.fhir import model as fhir_model
from gateway.hl7.definitions import definitions
from gateway.mapping.conditions import ConditionError, compile_condition, tokenize
from gateway.mapping.convert import ConversionError, from_date_time, from_time, from_value
from gateway.mapping.errors import TranslationError
from gateway.mapping.tables import FieldMap, MapRow, TableSet
from gateway.mapping.vocabulary import Vocab

Json = dict[str, Any]
Tree = dict[int, "Tree | str"]
Node = Tree | str
# (positions from the table's root, e.g. (5, rep, 1, 1) in a segment, (4, 2) in a CX)
Position = tuple[int, ...]

_SEGMENT_PATH = re.compile(r"([A-Z][A-Z0-9]{2})-(\d+)(?:\.(\d+))?(?:\.(\d+))?$")
_COMPONENT_PATH = re.compile(r"([A-Z][A-Z0-9]{1,3})\.(\d+)(?:\.(\d+))?$")
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_STEP = re.compile(r"([A-Za-z$][A-Za-z0-9]*)(?:\[(\d+)\])?$")
_DATES = frozenset({"date", "dateTime", "instant"})
_OUT_VERSION = "2.5.1"


class Bundle:
    """The resources of the document being translated, by fullUrl and by Type/id."""

    def __init__(self, resources: list[tuple[str, Json]]) -> None:
        self.by_url: dict[str, Json] = {}
        for full_url, resource in resources:
            if full_url:
                self.by_url[full_url] = resource
            rid = resource.get("id")
            if isinstance(rid, str) and rid:
                self.by_url.setdefault(f"{resource.get('resourceType')}/{rid}", resource)

    def resolve(self, reference: Any) -> Json | None:
        if not isinstance(reference, dict):
            return None
        target = reference.get("reference")
        if not isinstance(target, str):
            return None
        found = self.by_url.get(target)
        if found is None and "/" in target:
            found = self.by_url.get("/".join(target.rsplit("/", 2)[-2:]))
        return found


# -- v2 trees ---------------------------------------------------------------------------


def put(tree: Tree, position: Position, value: Node) -> bool:
    """Write at a position; False when a different value is already there.

    A value that extends the one present (a DTM with more precision) replaces it.
    """
    node = tree
    for step in position[:-1]:
        child = node.get(step)
        if child is None:
            child = node[step] = {}
        elif isinstance(child, str):
            child = node[step] = {1: child}
        node = child
    last = position[-1]
    present = node.get(last)
    if present is None or present == {}:
        node[last] = value
        return True
    if isinstance(present, str) and isinstance(value, str):
        if present == value:
            return True
        if value.startswith(present):
            node[last] = value
            return True
        return False
    if isinstance(present, str):
        present = node[last] = {1: present}
    if isinstance(value, str):
        value = {1: value}
    assert isinstance(present, dict)
    return _merge(present, value)


def _merge(into: Tree, other: Tree) -> bool:
    ok = True
    for key, item in other.items():
        ok = put(into, (key,), item) and ok
    return ok


def read(tree: Tree, position: Position) -> str:
    """The text at a position (the first part when the position holds a composite)."""
    node: Node | None = tree
    for step in position:
        if isinstance(node, str):
            return node if step == 1 else ""
        if node is None:
            return ""
        node = node.get(step)
    while isinstance(node, dict):
        node = node.get(1)
    return node or ""


def copy_tree(tree: Tree) -> Tree:
    return {k: (copy_tree(v) if isinstance(v, dict) else v) for k, v in tree.items()}


def serialise(node: Node, separators: str, escape: Callable[[str], str]) -> str:
    """A node as wire text, one separator per level (escaping every value)."""
    if isinstance(node, str):
        return escape(node)
    if not node:
        return ""
    if not separators:
        first = node.get(1)
        return serialise(first, "", escape) if first is not None else ""
    top = max(node)
    parts = [serialise(node[i], separators[1:], escape) if i in node else ""
             for i in range(1, top + 1)]
    return separators[0].join(parts).rstrip(separators[0])


# -- reading FHIR ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Step:
    key: str  # JSON key ("_birthDate" for a primitive's extension twin)
    repeats: bool
    index: int  # n of [n], 0 when unindexed
    list_path: str  # the target text up to this step, without this step's index


def _compile_path(root: str, target: str) -> tuple[list[_Step], fhir_model.Element]:
    if target == "$value":
        return [_Step("$value", False, 0, "$value")], fhir_model.Element(root, False)
    steps: list[_Step] = []
    node_type = root
    prefix = ""
    parts = target.split(".")
    element = fhir_model.Element(root, False)
    for i, part in enumerate(parts):
        match = _STEP.match(part)
        if match is None:
            raise fhir_model.UnknownElement(f"'{part}' is not an element name")
        name, index = match.group(1), int(match.group(2) or 0)
        element = fhir_model.element(node_type, name)
        key = name
        if element.is_primitive and i + 1 < len(parts):
            key = "_" + name
            element = fhir_model.Element("Element", element.repeats)
        list_path = f"{prefix}.{name}" if prefix else name
        prefix = f"{prefix}.{part}" if prefix else part
        steps.append(_Step(key, element.repeats, index, list_path))
        node_type = element.type
    return steps, element


def _flatten(node: Any, steps: list[_Step]) -> list[Any]:
    """Every value at a path, through every repetition (for matching constants)."""
    nodes = [node]
    for step in steps:
        nxt: list[Any] = []
        for n in nodes:
            if not isinstance(n, dict):
                continue
            value = n.get(step.key)
            if value is None:
                continue
            if isinstance(value, list):
                nxt.extend(v for v in value if v is not None)
            else:
                nxt.append(value)
        nodes = nxt
    return nodes


@dataclass(slots=True)
class _Constant:
    steps: list[_Step]  # relative to the instance the group writes
    value: Any
    condition: Callable[[object], bool] | None


# -- compiled rows -----------------------------------------------------------------------


@dataclass(slots=True)
class _Writer:
    order: int
    source: str  # the group (rows sharing a source)
    target: str
    field_no: int  # the segment field written (0 in data-type tables)
    max_reps: int  # in segment tables: how many repetitions the field allows
    head: list[_Step]  # up to the repetition step (exclusive)
    rep: _Step | None  # the first repeating step: its elements are the repetitions
    tail: list[_Step]
    convert: Callable[[Any, _Run], tuple[Node | None, bool]]  # -> (v2 value, recognised)
    positions: list[Position]  # where the value goes (several for a template)
    pattern: re.Pattern[str] | None  # a template's inverse
    literal: bool  # the template has literal text that recognises values
    condition: Callable[[object], bool] | None
    implied: list[tuple[Position, str]]  # what a plain condition needs written
    constants: list[_Constant] = field(default_factory=list)  # the group's, for ranking
    contested: bool = False


@dataclass(slots=True)
class _Claim:
    """Groups competing for the elements of one unindexed repeating element."""

    groups: list[str]
    hard: dict[str, list[_Constant]]
    soft: dict[str, list[_Constant]]
    capacity: dict[str, int]
    # the element's keys a group's rows carry (None: the whole element, through a map)
    covers: dict[str, set[str] | None] = field(default_factory=dict)


class _Run:
    """One inversion of one table on one FHIR value: caches of who owns which element."""

    __slots__ = ("bundle", "inverter", "owner", "indexed")

    def __init__(self, bundle: Bundle, inverter: Inverter) -> None:
        self.bundle = bundle
        self.inverter = inverter
        self.owner: dict[int, dict[str, list[Any]]] = {}
        self.indexed: dict[int, dict[int, list[Any]]] = {}


class TableInverse:
    """One table read backwards."""

    def __init__(self, table: FieldMap, inverter: Inverter) -> None:
        self.table = table
        self.inverter = inverter
        self.kind = table.kind
        self.writers: list[_Writer] = []
        self.claims: dict[str, _Claim] = {}
        # list path -> index -> constants naming it (extension[1] is the one whose url ...)
        self.indexes: dict[str, dict[int, list[_Constant]]] = {}
        self.pass1: list[_Writer] = []
        self.pass2: list[list[_Writer]] = []

    # -- running --------------------------------------------------------------------------

    def apply(self, root: Any, bundle: Bundle) -> Tree:
        run = _Run(bundle, self.inverter)
        tree: Tree = {}
        for writer in self.pass1:
            for rep, value in self._values(writer, root, run):
                node, _ = writer.convert(value, run)
                if node is None:
                    continue
                self._write(writer, tree, rep, value, node)
        ranked: list[tuple[int, list[tuple[_Writer, Node]]]] = []
        for slot in self.pass2:
            by_rep: dict[int, list[tuple[_Writer, Any]]] = {}
            for writer in slot:
                for rep, value in self._values(writer, root, run):
                    by_rep.setdefault(rep, []).append((writer, value))
            for rep, candidates in by_rep.items():
                ranked.append((rep, self._rank(tree, rep, candidates, root, run)))
        return self._settle(tree, ranked) if ranked else tree

    def _settle(self, base: Tree, ranked: list[tuple[int, list[tuple[_Writer, Node]]]]
                ) -> Tree:
        """Write the best candidate of each contested element, then check every condition
        on the whole result; a row whose condition fails gives way to the next candidate.
        (Conditions may depend on each other: CWE.1 needs CWE.3 valued and CWE.3 CWE.1.)"""
        choice = [0] * len(ranked)
        tree = base
        for _ in range(8):
            tree = copy_tree(base)
            chosen: list[tuple[int, _Writer]] = []
            for i, (rep, candidates) in enumerate(ranked):
                while choice[i] < len(candidates):
                    writer, node = candidates[choice[i]]
                    saved = copy_tree(tree)
                    if self._write(writer, tree, rep, None, node):
                        # What the condition needs and the row did not write (HD.3 = ISO).
                        for position, text in writer.implied:
                            at = self._at(writer, position, rep)
                            if not read(tree, at):
                                put(tree, at, text)
                        chosen.append((i, writer))
                        break
                    tree.clear()
                    tree.update(saved)
                    choice[i] += 1
            failed = [i for i, writer in chosen if writer.condition is not None and
                      not writer.condition((tree, ranked[i][0]))]
            if not failed:
                return tree
            for i in failed:
                choice[i] += 1
        return tree

    def _values(self, writer: _Writer, root: Any, run: _Run) -> list[tuple[int, Any]]:
        """(repetition, FHIR value) pairs for a row."""
        node = self._walk(root, writer.head, run)
        if node is None:
            return []
        if writer.rep is None:
            instances = [node]
        else:
            instances = self._elements(node, writer.rep, writer.source, run)
            if not instances:
                return []
            limit = writer.max_reps if self.kind == "segment" else 1
            instances = instances[:limit]
        out: list[tuple[int, Any]] = []
        for n, instance in enumerate(instances, start=1):
            value = self._walk(instance, writer.tail, run)
            if value is not None and value != "" and value != {}:
                out.append((n, value))
        return out

    def _walk(self, node: Any, steps: list[_Step], run: _Run) -> Any:
        for step in steps:
            if not isinstance(node, dict):
                return None
            if step.repeats:
                found = self._elements(node, step, "", run)
                node = found[0] if found else None
            else:
                node = node.get(step.key)
            if node is None:
                return None
        return node

    def _elements(self, node: Json, step: _Step, source: str, run: _Run) -> list[Any]:
        items = node.get(step.key)
        if items is None:
            return []
        if not isinstance(items, list):
            items = [items]
        if step.index:
            return self._assign_indexes(items, step.list_path, run).get(step.index, [])
        claim = self.claims.get(step.list_path)
        if claim is None or not source:
            return [i for i in items if i is not None]
        return self._assign_claims(items, claim, run).get(source, [])

    def _assign_indexes(self, items: list[Any], list_path: str, run: _Run
                        ) -> dict[int, list[Any]]:
        cached = run.indexed.get(id(items))
        if cached is not None:
            return cached
        indexes = self.indexes.get(list_path, {})
        named = [(n, c) for n, c in sorted(indexes.items()) if c]
        plain = [n for n, c in sorted(indexes.items()) if not c] or [1]
        out: dict[int, list[Any]] = {}
        left: list[Any] = []
        for item in items:
            if item is None:
                continue
            for n, constants in named:
                if all(_matches(item, c) == 1 for c in constants):
                    out.setdefault(n, []).append(item)
                    break
            else:
                left.append(item)
        for i, item in enumerate(left):
            out.setdefault(plain[min(i, len(plain) - 1)], []).append(item)
        run.indexed[id(items)] = out
        return out

    def _assign_claims(self, items: list[Any], claim: _Claim, run: _Run
                       ) -> dict[str, list[Any]]:
        cached = run.owner.get(id(items))
        if cached is not None:
            return cached
        out: dict[str, list[Any]] = {}
        for item in items:
            if item is None:
                continue
            best: tuple[int, int, int] | None = None
            owner = ""
            for order, group in enumerate(claim.groups):
                if len(out.get(group, ())) >= claim.capacity[group]:
                    continue
                hard = [_matches(item, c) for c in claim.hard.get(group, ())]
                if -1 in hard:
                    continue
                soft = [_matches(item, c) for c in claim.soft.get(group, ())]
                covers = claim.covers.get(group)
                # A group that would drop part of the element ranks below one that keeps it.
                keeps = 1 if covers is None or not isinstance(item, dict) or all(
                    k in covers for k in item) else 0
                score = (keeps, sum(hard) + sum(soft), -order)
                if best is None or score > best:
                    best, owner = score, group
            if owner:
                out.setdefault(owner, []).append(item)
        run.owner[id(items)] = out
        return out

    def _write(self, writer: _Writer, tree: Tree, rep: int, value: Any, node: Node) -> bool:
        if not writer.positions:
            return True  # a constant row: its condition's value was written instead
        if writer.pattern is None:
            return put(tree, self._at(writer, writer.positions[0], rep), node)
        match = writer.pattern.fullmatch(node if isinstance(node, str) else "")
        if match is None:
            return False
        ok = True
        for position, text in zip(writer.positions, match.groups(), strict=True):
            ok = put(tree, self._at(writer, position, rep), text) and ok
        return ok

    def _at(self, writer: _Writer, position: Position, rep: int) -> Position:
        if self.kind == "segment":
            return (position[0], rep, *position[1:])
        return position

    def _rank(self, tree: Tree, rep: int, candidates: list[tuple[_Writer, Any]],
              root: Any, run: _Run) -> list[tuple[_Writer, Node]]:
        """The candidate rows for one FHIR element, best first."""
        ranked: list[tuple[tuple[int, int, int], _Writer, Node]] = []
        for writer, value in candidates:
            node, recognised = writer.convert(value, run)
            if node is None:
                continue
            score = 0
            if writer.pattern is not None:
                if not isinstance(node, str) or writer.pattern.fullmatch(node) is None:
                    continue
                score += 2 if writer.literal else 0
            elif recognised:
                score += 2
            if self._redundant(writer, tree, rep, node):
                score += 3
            score += self._constant_score(writer, tree, rep, root, run)
            score -= sum(1 for position, _ in writer.implied
                         if position not in writer.positions and
                         not read(tree, self._at(writer, position, rep)))
            ranked.append(((-score, 1 if writer.condition else 0, writer.order), writer,
                           node))
        ranked.sort(key=lambda r: r[0])
        return [(writer, node) for _, writer, node in ranked]

    def _redundant(self, writer: _Writer, tree: Tree, rep: int, node: Node) -> bool:
        if not isinstance(node, str) or not writer.positions:
            return False
        if writer.pattern is None:
            return read(tree, self._at(writer, writer.positions[0], rep)) == node
        match = writer.pattern.fullmatch(node)
        return match is not None and all(
            read(tree, self._at(writer, p, rep)) == text
            for p, text in zip(writer.positions, match.groups(), strict=True))

    def _constant_score(self, writer: _Writer, tree: Tree, rep: int, root: Any,
                        run: _Run) -> int:
        if not writer.constants:
            return 0
        score = 0
        for constant in writer.constants:
            if constant.condition is not None and not constant.condition((tree, rep)):
                continue
            found = _matches(root, constant)
            score += found if constant.condition is None or found == 1 else -1
        return score


def _matches(node: Any, constant: _Constant) -> int:
    """1: the FHIR data holds the constant; 0: it holds nothing there; -1: something else."""
    values = _flatten(node, constant.steps)
    if not values:
        return 0
    return 1 if constant.value in values else -1


# -- the compiler ------------------------------------------------------------------------


class Inverter:
    """Every segment and data-type table, read backwards (compiled on first use)."""

    def __init__(self, tables: TableSet, vocabularies: dict[str, Vocab]) -> None:
        self.tables = tables
        self.vocabs = vocabularies
        self.skipped: list[str] = []
        self._inverses: dict[str, TableInverse] = {}
        self._v2 = definitions(_OUT_VERSION)
        self._v2_latest = definitions("2.8")

    def segment(self, name: str) -> TableInverse:
        return self._inverse(name, self.tables.segments[name])

    def datatype(self, name: str) -> TableInverse:
        return self._inverse(name, self.tables.datatypes[name])

    def _inverse(self, name: str, table: FieldMap) -> TableInverse:
        inverse = self._inverses.get(name)
        if inverse is None:
            inverse = self._inverses[name] = TableInverse(table, self)
            self._compile(inverse)
        return inverse

    def compile_all(self) -> None:
        for name in sorted(self.tables.datatypes):
            self.datatype(name)
        for name in sorted(self.tables.segments):
            self.segment(name)

    def _skip(self, row: MapRow, reason: str) -> None:
        self.skipped.append(f"{row.where.file}:{row.where.line}: {reason}")

    def _compile(self, inverse: TableInverse) -> None:
        table = inverse.table
        root = table.target_type
        constants: dict[str, list[tuple[str, _Constant, list[_Step]]]] = {}
        writers: list[_Writer] = []
        # What the forward map writes when the source is empty (status 'unknown'): a FHIR
        # value equal to it that no vocabulary recognises says nothing to write back.
        defaults = {row.target: row.value for row in table.rows
                    if row.target and not row.source and not row.condition and row.value}
        for order, row in enumerate(table.rows):
            if not row.target or not row.source:
                continue
            source = self._position(row.source, table)
            if source is None:
                self._skip(row, f"reads {row.source}, another segment: nothing to write")
                continue
            try:
                steps, element = _compile_path(root, row.target)
            except (fhir_model.UnknownElement, ValueError):
                continue  # the forward compiler reports it
            checked = self._condition(row, table)
            if checked is False:
                continue
            condition = checked if callable(checked) else None
            placeholders = _PLACEHOLDER.findall(row.value)
            if row.value and not placeholders:
                constant = _Constant([], _constant_value(row.value, element), condition)
                constants.setdefault(row.source, []).append((row.target, constant, steps))
                setter = self._constant_writer(order, row, table, source, steps, constant)
                if setter is not None:
                    writers.append(setter)
                continue
            writer = self._writer(order, row, table, source, steps, element, placeholders,
                                  condition)
            if writer is not None:
                if row.target in defaults:
                    writer.convert = _unless_default(writer.convert, defaults[row.target])
                writers.append(writer)
        self._index_constants(inverse, constants)
        self._claims(inverse, writers, constants)
        slots: dict[tuple[str, str], list[_Writer]] = {}
        for writer in writers:
            key = (writer.target, writer.source if writer.rep is not None and
                   not writer.rep.index else "")
            slots.setdefault(key, []).append(writer)
        for slot in slots.values():
            contested = len(slot) > 1
            for writer in slot:
                writer.contested = contested
            if not contested and slot[0].condition is None:
                inverse.pass1.append(slot[0])
            else:
                inverse.pass2.append(slot)
        inverse.writers = writers

    def _position(self, text: str, table: FieldMap) -> Position | None:
        if table.kind == "segment":
            match = _SEGMENT_PATH.match(text)
            if match is None or match.group(1) != table.v2_type:
                return None
            return tuple(int(g) for g in match.groups()[1:] if g)
        match = _COMPONENT_PATH.match(text)
        if match is None or match.group(1) != table.v2_type:
            return None
        return tuple(int(g) for g in match.groups()[1:] if g)

    def _condition(self, row: MapRow, table: FieldMap
                   ) -> Callable[[object], bool] | None | bool:
        """The condition read on the v2 being written; False when it cannot be."""
        if not row.condition:
            return None
        source = self._position(row.source, table)
        own_field = source[0] if source and table.kind == "segment" else 0

        def getter_for(text: str) -> Callable[[object], str]:
            position = self._position(text, table)
            if position is None:
                raise ConditionError(f"'{text}' is not in this {table.kind}")
            if table.kind == "segment":
                f, rest = position[0], position[1:]

                def in_segment(ctx: object) -> str:
                    tree, rep = typing.cast(tuple[Tree, int], ctx)
                    return read(tree, (f, rep if f == own_field else 1, *rest))
                return in_segment

            def in_datatype(ctx: object) -> str:
                tree, _ = typing.cast(tuple[Tree, int], ctx)
                return read(tree, position)
            return in_datatype

        try:
            return compile_condition(row.condition, getter_for)
        except ConditionError as exc:
            self._skip(row, f"condition cannot be checked on the v2 written ({exc})")
            return False

    def _writer(self, order: int, row: MapRow, table: FieldMap, source: Position,
                steps: list[_Step], element: fhir_model.Element, placeholders: list[str],
                condition: Callable[[object], bool] | None) -> _Writer | None:
        positions = [source]
        pattern: re.Pattern[str] | None = None
        literal = False
        if placeholders:
            positions = []
            for text in placeholders:
                position = self._position(text, table)
                if position is None:
                    self._skip(row, f"template quotes {text}, outside this {table.kind}")
                    return None
                positions.append(position)
            pieces = _PLACEHOLDER.split(row.value)
            literals = pieces[0::2]
            literal = any(literals)
            regex = "".join(re.escape(p) if i % 2 == 0 else
                            ("(.+)" if i == len(pieces) - 2 else "(.+?)")
                            for i, p in enumerate(pieces))
            pattern = re.compile(regex, re.DOTALL)
        if table.kind == "segment" and any(p[0] != source[0] for p in positions):
            self._skip(row, "writes a field other than its source")
            return None
        convert = self._converter(row, element)
        if convert is None:
            return None
        rep_at = next((i for i, s in enumerate(steps) if s.repeats), None)
        head = steps if rep_at is None else steps[:rep_at]
        rep = None if rep_at is None else steps[rep_at]
        tail = [] if rep_at is None else steps[rep_at + 1:]
        field_no = source[0] if table.kind == "segment" else 0
        return _Writer(order, row.source, row.target, field_no,
                       self._max_reps(table.v2_type, field_no), head, rep, tail, convert,
                       positions, pattern, literal, condition, _implied(row.condition, self,
                                                                        table))

    def _constant_writer(self, order: int, row: MapRow, table: FieldMap, source: Position,
                         steps: list[_Step], constant: _Constant) -> _Writer | None:
        """`XAD.7 EQUALS "M"` -> type = postal: a FHIR postal address writes XAD.7 = M."""
        implied = _implied(row.condition, self, table)
        if not implied or constant.condition is None:
            return None
        expected = constant.value

        def recognise(value: Any, run: _Run) -> tuple[Node | None, bool]:
            return ("", True) if value == expected else (None, False)

        rep_at = next((i for i, s in enumerate(steps) if s.repeats), None)
        field_no = source[0] if table.kind == "segment" else 0
        return _Writer(order, row.source, row.target, field_no,
                       self._max_reps(table.v2_type, field_no),
                       steps if rep_at is None else steps[:rep_at],
                       None if rep_at is None else steps[rep_at],
                       [] if rep_at is None else steps[rep_at + 1:], recognise, [], None,
                       False, constant.condition, implied)

    def _max_reps(self, segment: str, number: int) -> int:
        if not number:
            return 1
        for defs in (self._v2, self._v2_latest):
            definition = defs.segments.get(segment)
            found = definition.field(number) if definition else None
            if found is not None:
                reps = found.max_repetitions
                return 1000 if reps is None else max(reps, 1)
        return 1000

    def _converter(self, row: MapRow, element: fhir_model.Element
                   ) -> Callable[[Any, _Run], tuple[Node | None, bool]] | None:
        vocab = self.vocabs.get(row.vocabulary) if row.vocabulary else None
        where = row.target
        if row.map:
            if row.map not in self.tables.datatypes:
                return None
            produced = self.tables.datatypes[row.map].target_type
            makes_resource = fhir_model.is_resource_type(produced)
            name = row.map
            kind = element.type

            def mapped(value: Any, run: _Run) -> tuple[Node | None, bool]:
                recognised = False
                if makes_resource:
                    value = run.bundle.resolve(value)
                    if value is None or value.get("resourceType") != produced:
                        return None, False
                elif vocab is not None:
                    value, recognised = _unrecode(vocab, kind, value)
                inverse = run.inverter.datatype(name)
                root = {"$value": value} if produced in fhir_model.PRIMITIVE_TYPES else value
                if not isinstance(root, dict):
                    return None, False
                tree = inverse.apply(root, run.bundle)
                return (tree or None), recognised
            return mapped
        kind = element.type
        if not element.is_primitive:
            return None

        def primitive(value: Any, run: _Run) -> tuple[Node | None, bool]:
            if isinstance(value, (dict, list)):
                return None, False
            if kind in _DATES:
                try:
                    return from_date_time(str(value)), False
                except ConversionError as exc:
                    raise TranslationError(where, exc.reason, str(value)) from None
            if kind == "time":
                return from_time(str(value)), False
            if vocab is not None and isinstance(value, str):
                code = vocab_back(vocab, "", value)
                if code is not None:
                    return code, True
            text = from_value(value)
            return (text or None), False
        return primitive

    def _index_constants(self, inverse: TableInverse,
                         constants: dict[str, list[tuple[str, _Constant, list[_Step]]]]
                         ) -> None:
        for rows in constants.values():
            for _target, constant, steps in rows:
                for i, step in enumerate(steps):
                    if step.index:
                        named = inverse.indexes.setdefault(step.list_path, {})
                        bucket = named.setdefault(step.index, [])
                        if constant.condition is None and i + 1 < len(steps):
                            bucket.append(_Constant(steps[i + 1:], constant.value, None))
                        break
        for writer in self._writers_steps(inverse):
            for step in writer:
                if step.index:
                    inverse.indexes.setdefault(step.list_path, {}).setdefault(step.index, [])

    def _writers_steps(self, inverse: TableInverse) -> list[list[_Step]]:
        out = []
        for row in inverse.table.rows:
            if row.target and row.target != "$value":
                try:
                    out.append(_compile_path(inverse.table.target_type, row.target)[0])
                except (fhir_model.UnknownElement, ValueError):
                    continue
        return out

    def _claims(self, inverse: TableInverse, writers: list[_Writer],
                constants: dict[str, list[tuple[str, _Constant, list[_Step]]]]) -> None:
        for writer in writers:
            if writer.rep is None or writer.rep.index:
                continue
            list_path = writer.rep.list_path
            rep_at = len(writer.head)
            claim = inverse.claims.setdefault(list_path, _Claim([], {}, {}, {}))
            covered = claim.covers.setdefault(writer.source, set())
            if not writer.tail or covered is None:
                claim.covers[writer.source] = None
            else:
                covered.add(writer.tail[0].key)
            if writer.source not in claim.groups:
                claim.groups.append(writer.source)
                claim.capacity[writer.source] = (writer.max_reps if inverse.kind == "segment"
                                                 else 1)
            for _target, constant, steps in constants.get(writer.source, ()):
                if len(steps) <= rep_at or steps[rep_at].list_path != list_path or \
                        steps[rep_at].index:
                    continue
                relative = _Constant(steps[rep_at + 1:], constant.value, constant.condition)
                group_covers = claim.covers.get(writer.source)
                if group_covers is not None and len(steps) > rep_at + 1:
                    group_covers.add(steps[rep_at + 1].key)
                bucket = claim.soft if constant.condition else claim.hard
                known = bucket.setdefault(writer.source, [])
                if all(k.steps != relative.steps for k in known):
                    known.append(relative)
        # The group's constants also rank rows that write the same element.
        for writer in writers:
            for _target, constant, steps in constants.get(writer.source, ()):
                if writer.rep is not None and not writer.rep.index:
                    continue
                writer.constants.append(_Constant(steps, constant.value, constant.condition))


def _unless_default(convert: Callable[[Any, _Run], tuple[Node | None, bool]], default: str
                    ) -> Callable[[Any, _Run], tuple[Node | None, bool]]:
    def unless_default(value: Any, run: _Run) -> tuple[Node | None, bool]:
        node, recognised = convert(value, run)
        if not recognised and value == default:
            return None, False
        return node, recognised
    return unless_default


def _constant_value(text: str, element: fhir_model.Element) -> Any:
    if element.type == "boolean":
        return text.strip().lower() in ("true", "y", "yes", "1")
    if element.type in ("integer", "positiveInt", "unsignedInt"):
        try:
            return int(text)
        except ValueError:
            return text
    return text


def _implied(condition: str, inverter: Inverter, table: FieldMap) -> list[tuple[Position, str]]:
    """`X EQUALS "c"` or `X IN ("c", ...)`: writing c at X (when empty) satisfies it."""
    if not condition:
        return []
    try:
        tokens = [t.text for t in tokenize(condition)]
    except ConditionError:
        return []
    if tokens and tokens[0].upper() == "IF":
        tokens = tokens[1:]
    if len(tokens) == 3 and tokens[1].upper() == "EQUALS":
        value = tokens[2]
    elif len(tokens) >= 5 and tokens[1].upper() == "IN" and tokens[2] == "(":
        value = tokens[3]
    else:
        return []
    position = inverter._position(tokens[0], table)
    if position is None or not value.startswith('"'):
        return []
    return [(position, value[1:-1])]


def vocab_back(vocab: Vocab, system: str, code: str) -> str | None:
    """The v2 code for a FHIR code: exact rows, then prefix rows (`HL7*` <- `v2-{*}`)."""
    hit = vocab.reverse.get((system, code)) if system else None
    if hit is None:
        hit = vocab.reverse.get(("", code))
    if hit is not None:
        return hit
    for prefix, (fhir_code, _, _) in vocab.prefixes:
        if fhir_code == "{code}":
            continue  # '*' kept the code as sent: nothing to undo, and no v2 code to claim
        if "{*}" in fhir_code:
            before, _, after = fhir_code.partition("{*}")
            if code.startswith(before) and code.endswith(after) and \
                    len(code) > len(before) + len(after):
                return prefix + code[len(before):len(code) - len(after)]
    return None


def _unrecode(vocab: Vocab, kind: str, value: Any) -> tuple[Any, bool]:
    """Undo the forward translation of a first coding: drop the coding the vocabulary
    added, or turn a FHIR-native code back into the v2 code."""
    if kind == "code":
        if isinstance(value, str):
            code = vocab_back(vocab, "", value)
            return (code, True) if code is not None else (value, False)
        return value, False
    if kind == "Coding" and isinstance(value, dict):
        code = vocab_back(vocab, str(value.get("system", "")), str(value.get("code", "")))
        if code is None:
            return value, False
        return {"code": code}, True
    if kind != "CodeableConcept" or not isinstance(value, dict):
        return value, False
    codings = value.get("coding")
    if not isinstance(codings, list) or not codings or not isinstance(codings[0], dict):
        return value, False
    first = codings[0]
    if len(codings) > 1 and isinstance(codings[1], dict):
        original = codings[1]
        hit = vocab.lookup(str(original.get("code", "")))
        if hit is not None and hit[0] == first.get("code") and (
                hit[2] or None) == first.get("system"):
            return {**value, "coding": codings[1:]}, True
    code = vocab_back(vocab, str(first.get("system", "")), str(first.get("code", "")))
    hit = vocab.lookup(code) if code is not None else None
    if code is None or hit is None:
        return value, False
    if code == first.get("code") and (hit[2] or None) == first.get("system"):
        return value, True  # the forward map merged the two codings into this one
    return {**value, "coding": [{"code": code}, *codings[1:]]}, True
