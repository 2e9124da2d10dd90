"""Segment and data-type tables read backwards: FHIR elements -> HL7 v2 positions.

The forward compiler (mapping/compiler/) turns each row into "read v2 here, write FHIR there";
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
another segment (`MSH-9.2`), conditions or templates naming another segment. The compiled
rows are run by TableInverse (inverse.py).
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from typing import Any

from gateway.fhir import model as fhir_model
from gateway.hl7.definitions import definitions
from gateway.hl7.location import ComponentLocation, Location
from gateway.mapping.conditions import ConditionError, compile_condition, tokenize
from gateway.mapping.convert import ConversionError, from_date_time, from_time, from_value
from gateway.mapping.errors import TranslationError
from gateway.mapping.tables import FieldMap, MapRow, TableSet, source_location
from gateway.mapping.to_v2.fhir_paths import Step, compile_path
from gateway.mapping.to_v2.inverse import Claim, Constant, InverseRun, TableInverse, Writer
from gateway.mapping.to_v2.tree import Node, Position, Tree, read
from gateway.mapping.vocabulary import Vocab, unrecode, vocab_back

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_DATES = frozenset({"date", "dateTime", "instant"})
_OUT_VERSION = "2.5.1"


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
        constants: dict[str, list[tuple[str, Constant, list[Step]]]] = {}
        writers: list[Writer] = []
        # What the forward map writes when the source is empty (status 'unknown'): a FHIR
        # value equal to it that no vocabulary recognises says nothing to write back.
        defaults = {row.target: row.value for row in table.rows
                    if row.target and not row.source and not row.condition and row.value}
        for order, row in enumerate(table.rows):
            if not row.target or not row.source:
                continue
            source = position_in(row.source, table)
            if source is None and table.kind != "segment" and row.source == table.v2_type:
                source = ()  # the whole value (PL in PL-Location): the map's tree is merged
            if source is None:
                self._skip(row, f"reads {row.source}, another segment: nothing to write")
                continue
            try:
                steps, element = compile_path(root, row.target)
            except (fhir_model.UnknownElement, ValueError):
                continue  # the forward compiler reports it
            checked = self._condition(row, table)
            if checked is False:
                continue
            condition = checked if callable(checked) else None
            placeholders = _PLACEHOLDER.findall(row.value)
            if row.value and not placeholders:
                constant = Constant([], _constant_value(row.value, element), condition)
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
        self._signature(inverse, constants)
        self._claims(inverse, writers, constants)
        slots: dict[tuple[str, str], list[Writer]] = {}
        for writer in writers:
            # Rows mapping one complex element from two fields (OBX-5 SN's comparator and
            # value, OBX-6's units, both in valueQuantity) complement each other: each field
            # chooses its own row. Primitives from several fields are alternatives.
            mapped = table.kind == "segment" and bool(table.rows[writer.order].map)
            key = (writer.target, writer.source if writer.rep is not None and
                   not writer.rep.index else str(writer.field_no) if mapped else "")
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

    def _condition(self, row: MapRow, table: FieldMap
                   ) -> Callable[[object], bool] | None | bool:
        """The condition read on the v2 being written; False when it cannot be."""
        if not row.condition:
            return None
        source = position_in(row.source, table)
        own_field = source[0] if source and table.kind == "segment" else 0

        def getter_for(text: str) -> Callable[[object], str]:
            position = position_in(text, table)
            if position is None:
                raise ConditionError(f"'{text}' is not in this {table.kind}")
            if table.kind == "segment":
                f, rest = position[0], position[1:]
                found = source_location(text)
                nth = found.repetition if isinstance(found, Location) else None

                def in_segment(ctx: object) -> str:
                    tree, rep = typing.cast(tuple[Tree, int], ctx)
                    if nth is not None:  # a named repetition (`OBX-5(2)`) as written
                        return read(tree, (f, nth, *rest))
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
                steps: list[Step], element: fhir_model.Element, placeholders: list[str],
                condition: Callable[[object], bool] | None) -> Writer | None:
        positions = [source]
        pattern: re.Pattern[str] | None = None
        literal = False
        if placeholders:
            positions = []
            for text in placeholders:
                position = position_in(text, table)
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
        return Writer(order, row.source, row.target, field_no,
                       self._max_reps(table.v2_type, field_no), head, rep, tail, convert,
                       positions, pattern, literal, condition, _implied(row.condition, table))

    def _constant_writer(self, order: int, row: MapRow, table: FieldMap, source: Position,
                         steps: list[Step], constant: Constant) -> Writer | None:
        """`XAD.7 EQUALS "M"` -> type = postal: a FHIR postal address writes XAD.7 = M."""
        implied = _implied(row.condition, table)
        if not implied or constant.condition is None:
            return None
        expected = constant.value

        def recognise(value: Any, run: InverseRun) -> tuple[Node | None, bool]:
            return ("", True) if value == expected else (None, False)

        rep_at = next((i for i, s in enumerate(steps) if s.repeats), None)
        field_no = source[0] if table.kind == "segment" else 0
        return Writer(order, row.source, row.target, field_no,
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
                   ) -> Callable[[Any, InverseRun], tuple[Node | None, bool]] | None:
        vocab = self.vocabs.get(row.vocabulary) if row.vocabulary else None
        where = row.target
        if row.map:
            if row.map not in self.tables.datatypes:
                return None
            produced = self.tables.datatypes[row.map].target_type
            makes_resource = fhir_model.is_resource_type(produced)
            name = row.map
            kind = element.type

            def mapped(value: Any, run: InverseRun) -> tuple[Node | None, bool]:
                recognised = False
                if makes_resource:
                    value = run.bundle.resolve(value)
                    if value is None or value.get("resourceType") != produced:
                        return None, False
                    if not run.inverter.datatype(name).recognises(value):
                        return None, False
                elif vocab is not None:
                    value, recognised = unrecode(vocab, kind, value)
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

        def primitive(value: Any, run: InverseRun) -> tuple[Node | None, bool]:
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
                         constants: dict[str, list[tuple[str, Constant, list[Step]]]]
                         ) -> None:
        for rows in constants.values():
            for _target, constant, steps in rows:
                for i, step in enumerate(steps):
                    if step.index:
                        named = inverse.indexes.setdefault(step.list_path, {})
                        bucket = named.setdefault(step.index, [])
                        if constant.condition is None and i + 1 < len(steps):
                            bucket.append(Constant(steps[i + 1:], constant.value, None))
                        break
        for writer in self._writers_steps(inverse):
            for step in writer:
                if step.index:
                    inverse.indexes.setdefault(step.list_path, {}).setdefault(step.index, [])

    def _signature(self, inverse: TableInverse,
                   constants: dict[str, list[tuple[str, Constant, list[Step]]]]) -> None:
        """The values the table's unconditional constants allow at each path: a resource
        holding none of them there was not made by this table (a floor Location is not a
        room: `physicalType` lvl is not ro)."""
        for rows in constants.values():
            for target, constant, steps in rows:
                if constant.condition is None:
                    allowed = inverse.signature.setdefault(target, (steps, set()))[1]
                    allowed.add(constant.value)

    def _writers_steps(self, inverse: TableInverse) -> list[list[Step]]:
        out = []
        for row in inverse.table.rows:
            if row.target and row.target != "$value":
                try:
                    out.append(compile_path(inverse.table.target_type, row.target)[0])
                except (fhir_model.UnknownElement, ValueError):
                    continue
        return out

    def _claims(self, inverse: TableInverse, writers: list[Writer],
                constants: dict[str, list[tuple[str, Constant, list[Step]]]]) -> None:
        for writer in writers:
            if writer.rep is None or writer.rep.index:
                continue
            list_path = writer.rep.list_path
            rep_at = len(writer.head)
            claim = inverse.claims.setdefault(list_path, Claim([], {}, {}, {}))
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
                relative = Constant(steps[rep_at + 1:], constant.value, constant.condition)
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
                writer.constants.append(Constant(steps, constant.value, constant.condition))


def _unless_default(convert: Callable[[Any, InverseRun], tuple[Node | None, bool]], default: str
                    ) -> Callable[[Any, InverseRun], tuple[Node | None, bool]]:
    def unless_default(value: Any, run: InverseRun) -> tuple[Node | None, bool]:
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


def _implied(condition: str, table: FieldMap) -> list[tuple[Position, str]]:
    """`X EQUALS "c"` or `X IN ("c", ...)`, alone or joined by AND to other clauses: writing
    c at X (when empty) satisfies that clause (the others are checked on the result)."""
    if not condition:
        return []
    try:
        tokens = [t.text for t in tokenize(condition)]
    except ConditionError:
        return []
    if tokens and tokens[0].upper() == "IF":
        tokens = tokens[1:]
    clauses: list[list[str]] = [[]]
    depth = 0
    for token in tokens:
        depth += (token == "(") - (token == ")")
        if depth == 0 and token.upper() == "OR":
            return []  # either side may hold: nothing is implied
        if depth == 0 and token.upper() == "AND":
            clauses.append([])
        else:
            clauses[-1].append(token)
    out: list[tuple[Position, str]] = []
    for clause in clauses:
        if len(clause) == 3 and clause[1].upper() == "EQUALS":
            value = clause[2]
        elif len(clause) >= 5 and clause[1].upper() == "IN" and clause[2] == "(":
            value = clause[3]
        else:
            continue
        position = position_in(clause[0], table)
        if position is not None and value.startswith('"'):
            out.append((position, value[1:-1]))
    return out


def position_in(text: str, table: FieldMap) -> Position | None:
    """The position a location of the table's own segment or data type names; None for
    another segment's (or anything that is not a location)."""
    found = source_location(text)
    if table.kind == "segment":
        if not isinstance(found, Location) or found.segment != table.v2_type:
            return None
        numbers = (found.field, found.component, found.subcomponent)
    else:
        if not isinstance(found, ComponentLocation) or found.datatype != table.v2_type:
            return None
        numbers = (found.component, found.subcomponent, None)
    return tuple(n for n in numbers if n is not None)
