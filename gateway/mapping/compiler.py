"""Check every table against HL7 v2 and the FHIR R4 model, and compile it into closures.

Compilation happens once, at start-up. Each row becomes a small function that reads its
v2 source, converts it and writes it at its FHIR path; a table becomes a list of those; a
message map becomes one function that walks the segments. No table text is looked at
while a message is translated.

Every problem found is collected (file:line: reason), so one `isthmus mappings check`
shows them all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gateway.fhir import model as fhir_model
from gateway.hl7.definitions import definitions
from gateway.mapping import v2types
from gateway.mapping.conditions import ConditionError, Getter, compile_condition
from gateway.mapping.convert import ConversionError, Converters, date_time, encode_base64, to_string
from gateway.mapping.errors import TableError, TableErrors, TranslationError
from gateway.mapping.runtime import Json, Run, leaf
from gateway.mapping.tables import (
    FieldMap,
    MapRow,
    MessageMap,
    MessageRow,
    TableSet,
    Vocabulary,
    Where,
)

# (parts at this level, separators below them, the run, the v2 location) -> value or None
DatatypeFn = Callable[[list[str], str, Run, str], Any]
# (the segment's fields, the run, the resource content being written)
SegmentFn = Callable[[list[str], Run, Json], None]
MessageFn = Callable[[Run], None]

_SEGMENT_PATH = re.compile(r"([A-Z][A-Z0-9]{2})-(\d+)(?:\.(\d+))?(?:\.(\d+))?$")
_COMPONENT_PATH = re.compile(r"([A-Z][A-Z0-9]{1,3})\.(\d+)(?:\.(\d+))?$")
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_REFERENCE_TYPE = re.compile(r"Reference\(([A-Za-z]+)\)$")
_LINK = re.compile(r'(?:([A-Z][A-Za-z]+)\.)?([A-Za-z][A-Za-z0-9.]*)(\+?=)(.+)$')
_LATEST_V2 = "2.8"
_NULL = '""'  # the HL7 explicit null: "no value", never the two-character text


@dataclass(frozen=True, slots=True)
class V2Path:
    """A v2 location: SEG-f[.c[.s]] in segment tables, DT.c[.s] in data-type tables."""

    segment: str  # segment id, or "" for a data-type component
    field: int  # field number, or the component number in a data-type table
    component: int
    subcomponent: int

    def __str__(self) -> str:
        head = f"{self.segment}-{self.field}" if self.segment else f".{self.field}"
        return head + (f".{self.component}" if self.component else "") + (
            f".{self.subcomponent}" if self.subcomponent else "")


class Scope:
    """What a row reads: the parts at its level, and the repetition being mapped."""

    __slots__ = ("parts", "seps", "run", "rep_field", "rep", "rep_tag", "src_tag", "memo")

    def __init__(self, parts: list[str], seps: str, run: Run) -> None:
        self.memo: dict[tuple[int, int, int], str] = {}
        self.parts = parts
        self.seps = seps
        self.run = run
        self.rep_field = 0
        self.rep = ""
        # Instance keys: rows of one source and repetition share unindexed instances
        # (src_tag); indexed ones (coding[1]) are shared by every row of the repetition.
        self.rep_tag = "#1"
        self.src_tag = "@#1"


# A row returns whether it applied (its condition held), written or not.
Row = Callable[[Scope, str, str, str, dict[str, Json], Json], bool]
Group = Callable[[Scope, dict[str, Json], Json, str], None]
Setter = Callable[[Json, dict[str, Json], str, str, Any], None]


class Vocab:
    """A compiled vocabulary: exact codes, then prefix wildcards (HL7*), then '*'."""

    def __init__(self, table: Vocabulary) -> None:
        self.name = table.name
        self.exact: dict[str, tuple[str, str, str]] = {}
        self.prefixes: list[tuple[str, tuple[str, str, str]]] = []
        self.reverse: dict[tuple[str, str], str] = {}
        for row in table.rows:
            target = (row.fhir_code, row.fhir_display, row.fhir_system)
            if row.code.endswith("*"):
                self.prefixes.append((row.code[:-1], target))
            else:
                self.exact[row.code] = target
                self.reverse.setdefault((row.fhir_system, row.fhir_code), row.code)
                self.reverse.setdefault(("", row.fhir_code), row.code)
        # Longest prefix first, so 'HL7*' wins over '*'.
        self.prefixes.sort(key=lambda p: -len(p[0]))

    def lookup(self, code: str) -> tuple[str, str, str] | None:
        hit = self.exact.get(code)
        if hit is not None:
            return hit
        for prefix, (fhir_code, display, system) in self.prefixes:
            if code.startswith(prefix):
                rest = code[len(prefix):]
                return (fhir_code.replace("{*}", rest).replace("{code}", code),
                        display, system.replace("{*}", rest).replace("{code}", code))
        return None


class Compiled:
    """Everything the engine needs, compiled: message functions by message type."""

    def __init__(self, events: dict[str, MessageFn], messages: dict[str, MessageFn],
                 vocabularies: dict[str, Vocab], tables: TableSet) -> None:
        self.events = events
        self.messages = messages
        self.vocabularies = vocabularies
        self.tables = tables


def compile_tables(tables: TableSet, converters: Converters) -> Compiled:
    """Check and compile; raise TableErrors listing every problem found."""
    return _Compiler(tables, converters).run()


class _Compiler:
    def __init__(self, tables: TableSet, converters: Converters) -> None:
        self.tables = tables
        self.converters = converters
        self.errors: list[TableError] = []
        self.v2 = definitions(_LATEST_V2)
        self.vocabs = {name: Vocab(v) for name, v in tables.vocabularies.items()}
        self.datatype_fns: dict[str, DatatypeFn] = {}
        self.segment_fns: dict[str, tuple[SegmentFn, frozenset[int]]] = {}
        self._compiling: set[str] = set()

    def run(self) -> Compiled:
        for vocab in self.tables.vocabularies.values():
            self._check_vocabulary(vocab)
        for name in sorted(self.tables.datatypes):
            self.datatype(name, Where(self.tables.datatypes[name].file, 0))
        for name in sorted(self.tables.segments):
            self.segment(name, Where(self.tables.segments[name].file, 0))
        messages = {name: self._message(table) for name, table in
                    sorted(self.tables.messages.items())}
        events: dict[str, MessageFn] = {}
        for row in self.tables.events:
            if not re.fullmatch(r"[A-Z0-9]{3}\^[A-Z0-9]{3}", row.message_type):
                self.errors.append(row.where.error(
                    f"message type '{row.message_type}' must look like ADT^A01"))
            elif row.message_type in events:
                self.errors.append(row.where.error(f"{row.message_type} is mapped twice"))
            elif row.map not in messages:
                self.errors.append(row.where.error(f"unknown message map '{row.map}'"))
            else:
                events[row.message_type] = messages[row.map]
        if self.errors:
            raise TableErrors(self.errors)
        return Compiled(events, messages, self.vocabs, self.tables)

    # -- vocabularies --------------------------------------------------------------------

    def _check_vocabulary(self, vocab: Vocabulary) -> None:
        seen: dict[str, str] = {}
        for row in vocab.rows:
            if not row.code:
                self.errors.append(row.where.error("code is empty"))
            if not row.fhir_code:
                self.errors.append(row.where.error("fhir_code is empty"))
            if row.code in seen:
                same = seen[row.code] == row.fhir_code
                self.errors.append(row.where.error(
                    f"code '{row.code}' is listed twice" + ("" if same else
                                                            " with different FHIR codes")))
            seen[row.code] = row.fhir_code
            if any(c.isspace() for c in row.fhir_system):
                self.errors.append(row.where.error("fhir_system is not a URI"))

    # -- data-type tables ----------------------------------------------------------------

    def datatype(self, name: str, where: Where) -> DatatypeFn | None:
        """The compiled data-type table `name` (compiled on first use)."""
        if name in self.datatype_fns:
            return self.datatype_fns[name]
        table = self.tables.datatypes.get(name)
        if table is None:
            self.errors.append(where.error(f"unknown data-type map '{name}'"))
            return None
        if name in self._compiling:
            self.errors.append(where.error(f"data-type map '{name}' refers to itself"))
            return None
        self._compiling.add(name)
        try:
            fn = self._compile_datatype(table)
        finally:
            self._compiling.discard(name)
        self.datatype_fns[name] = fn
        return fn

    def _compile_datatype(self, table: FieldMap) -> DatatypeFn:
        where0 = Where(table.file, 1)
        if table.v2_type not in v2types.COMPONENTS:
            self.errors.append(where0.error(f"unknown HL7 v2 data type '{table.v2_type}'"))
        if not fhir_model.is_type(table.target_type):
            self.errors.append(where0.error(f"unknown FHIR type '{table.target_type}'"))
        groups = self._groups(table)
        primitive = table.target_type in fhir_model.PRIMITIVE_TYPES

        def apply(parts: list[str], seps: str, run: Run, location: str) -> Any:
            scope = Scope(parts, seps, run)
            out: Json = {}
            inst: dict[str, Json] = {}
            count = len(parts)
            for index, group in groups:
                # An empty component costs one comparison, not a call (most are empty).
                if index < 0 or (index < count and parts[index]):
                    group(scope, inst, out, location)
            if primitive:
                return out.get("$value")
            return out or None

        return apply

    # -- segment tables ------------------------------------------------------------------

    def segment(self, name: str, where: Where) -> tuple[SegmentFn, frozenset[int]] | None:
        if name in self.segment_fns:
            return self.segment_fns[name]
        table = self.tables.segments.get(name)
        if table is None:
            self.errors.append(where.error(f"unknown segment map '{name}'"))
            return None
        where0 = Where(table.file, 1)
        if not self._known_segment(table.v2_type):
            self.errors.append(where0.error(f"unknown HL7 v2 segment '{table.v2_type}'"))
        if not fhir_model.is_resource_type(table.target_type):
            self.errors.append(where0.error(
                f"'{table.target_type}' is not a FHIR R4 resource type"))
        groups = self._groups(table)
        read = frozenset(self._fields_read(table))
        segment_id = table.v2_type

        def apply(fields: list[str], run: Run, content: Json) -> None:
            scope = Scope(fields, "", run)
            inst: dict[str, Json] = {}
            count = len(fields)
            for index, group in groups:
                if index < 0 or (index < count and fields[index]):
                    group(scope, inst, content, segment_id)

        self.segment_fns[name] = (apply, read)
        return self.segment_fns[name]

    def _fields_read(self, table: FieldMap) -> Iterable[int]:
        for row in table.rows:
            path = self._parse_source(row.source, table, row.where, quiet=True)
            if path is not None and path.segment == table.v2_type:
                yield path.field

    def _known_segment(self, segment_id: str) -> bool:
        return segment_id.startswith("Z") or segment_id in self.v2.segment_ids

    # -- rows, grouped by source ----------------------------------------------------------

    def _groups(self, table: FieldMap) -> list[tuple[int, Group]]:
        """Groups in table order, each with the index of the part it reads (-1: always run)."""
        indexed = []
        for source, group in self._source_groups(table):
            if source is None or (table.kind == "segment" and source.segment != table.v2_type):
                index = -1
            else:
                index = source.field - 1 if table.kind == "datatype" else source.field
            indexed.append((index, group))
        return indexed

    def _source_groups(self, table: FieldMap) -> list[tuple[V2Path | None, Group]]:
        """Rows sharing a source run together per repetition, sharing new instances."""
        by_source: dict[str, list[MapRow]] = {}
        for row in table.rows:
            by_source.setdefault(row.source, []).append(row)
        self._check_duplicates(table)
        groups = []
        for source, rows in by_source.items():
            path = self._parse_source(source, table, rows[0].where) if source else None
            if source and path is None:
                continue
            compiled = self._compile_rows(rows, table, path)
            # A field whose every row is conditional is counted as unmapped when none
            # applies, unless a documentation row (no target) says it may be left out.
            count_unmatched = bool(compiled) and all(
                r.condition for r in rows if r.target) and all(r.target for r in rows)
            groups.append((path, self._group(table, path, compiled, count_unmatched)))
        return groups

    def _compile_rows(self, rows: list[MapRow], table: FieldMap,
                      path: V2Path | None) -> list[Row]:
        """Value rows first, then constants. A constant for an element that a value row of
        the group makes (location.status beside location.location) only fills that
        element in when it exists: it never makes a half element of its own."""
        values = [r for r in rows if not r.value or "{" in r.value]
        constants = [r for r in rows if r.value and "{" not in r.value]
        made = {first for r in values if r.target
                if (first := _first_repeating(table.target_type, r.target)) is not None}
        compiled: list[Row] = []
        for row in values:
            applied = self._row(row, table, path)
            if applied is not None:
                compiled.append(applied)
        for row in constants:
            applied = self._row(row, table, path)
            if applied is None:
                continue
            first = _first_repeating(table.target_type, row.target) if row.target else None
            compiled.append(_only_into_existing(applied, first) if first in made else applied)
        return compiled

    def _check_duplicates(self, table: FieldMap) -> None:
        seen: dict[tuple[str, str, str, str], MapRow] = {}
        single: dict[tuple[str, str], MapRow] = {}
        for row in table.rows:
            key = (row.source, row.condition, row.target, row.value)
            if key in seen:
                self.errors.append(row.where.error(
                    f"duplicate of line {seen[key].where.line} (same source, condition "
                    "and target)"))
                continue
            seen[key] = row
            if row.condition or "[" in row.target or not row.target or "{" in row.value:
                continue
            element = self._element_or_none(table.target_type, row.target)
            if element is None or element.repeats:
                continue
            other = single.get((row.target, row.source))
            if other is not None and other.value != row.value:
                self.errors.append(row.where.error(
                    f"contradicts line {other.where.line}: both set {row.target} "
                    "unconditionally"))
            single[(row.target, row.source)] = row

    def _element_or_none(self, root: str, target: str) -> fhir_model.Element | None:
        if target == "$value":
            return None
        try:
            return fhir_model.element(root, _strip_indexes(target))
        except fhir_model.UnknownElement:
            return None

    def _parse_source(self, text: str, table: FieldMap, where: Where,
                      quiet: bool = False) -> V2Path | None:
        path = self._parse_v2_path(text, table, where, quiet)
        return path

    def _parse_v2_path(self, text: str, table: FieldMap, where: Where,
                       quiet: bool = False) -> V2Path | None:
        def fail(reason: str) -> None:
            if not quiet:
                self.errors.append(where.error(reason))

        match = _SEGMENT_PATH.match(text)
        if match is not None:
            if table.kind != "segment":
                fail(f"'{text}': a data-type table reads components ({table.v2_type}.n)")
                return None
            segment, f, c, s = match.group(1), int(match.group(2)), match.group(3), \
                match.group(4)
            if not self._known_segment(segment):
                fail(f"'{text}': unknown segment {segment}")
                return None
            if not segment.startswith("Z"):
                definition = self.v2.segments.get(segment)
                top = max((fd.number for fd in definition.fields), default=0) if definition \
                    else 0
                if f < 1 or f > top:
                    fail(f"'{text}': {segment} has no field {f} (it has {top})")
                    return None
            return V2Path(segment, f, int(c or 0), int(s or 0))
        match = _COMPONENT_PATH.match(text)
        if match is not None:
            if table.kind != "datatype":
                fail(f"'{text}': a segment table reads fields (SEG-n)")
                return None
            datatype, c, s = match.group(1), int(match.group(2)), match.group(3)
            if datatype != table.v2_type:
                fail(f"'{text}': this table maps {table.v2_type}, not {datatype}")
                return None
            count = v2types.COMPONENTS.get(datatype, 0)
            if c < 1 or c > count:
                fail(f"'{text}': {datatype} has no component {c} (it has {count})")
                return None
            return V2Path("", c, int(s or 0), 0)
        fail(f"'{text}' is not a v2 location (PID-3, PID-3.1, CX.4)")
        return None

    # -- one row -----------------------------------------------------------------------------

    def _row(self, row: MapRow, table: FieldMap, source: V2Path | None) -> Row | None:
        before = len(self.errors)
        where = row.where
        if not row.target:
            if row.value or row.map:
                self.errors.append(where.error("a row with a map or a value needs a target"))
            return None  # a documentation row: this field is deliberately not mapped
        setter = self._setter(table, row)
        element = self._target_element(table, row)
        condition = self._condition(row.condition, table, source, where)
        produce = self._producer(row, table, source, element)
        if len(self.errors) > before or setter is None or produce is None:
            return None

        if condition is None and getattr(produce, "plain_text", False):
            def apply(scope: Scope, raw: str, seps: str, location: str,
                      inst: dict[str, Json], out: Json) -> bool:
                # The commonest row, fused: plain text, no condition (one call, not three).
                text = leaf(raw, seps) if seps else raw
                if text and text != _NULL:
                    setter(out, inst, scope.rep_tag, scope.src_tag, scope.run.text(text))
                return True
        elif condition is None:
            def apply(scope: Scope, raw: str, seps: str, location: str,
                      inst: dict[str, Json], out: Json) -> bool:
                value = produce(scope, raw, seps, location)
                if value is not None:
                    setter(out, inst, scope.rep_tag, scope.src_tag, value)
                return True
        else:
            def apply(scope: Scope, raw: str, seps: str, location: str,
                      inst: dict[str, Json], out: Json) -> bool:
                if not condition(scope):
                    return False
                value = produce(scope, raw, seps, location)
                if value is not None:
                    setter(out, inst, scope.rep_tag, scope.src_tag, value)
                return True
        return apply

    def _target_element(self, table: FieldMap, row: MapRow) -> fhir_model.Element | None:
        if row.target == "$value":
            if table.target_type not in fhir_model.PRIMITIVE_TYPES:
                self.errors.append(row.where.error(
                    f"$value is only for tables whose target is a primitive, not "
                    f"{table.target_type}"))
                return None
            return fhir_model.Element(table.target_type, False)
        try:
            element = fhir_model.element(table.target_type, _strip_indexes(row.target))
        except fhir_model.UnknownElement as exc:
            self.errors.append(row.where.error(
                f"'{row.target}' is not an element of {table.target_type}: {exc}"))
            return None
        declared = row.type
        reference = _REFERENCE_TYPE.match(declared)
        if reference is not None:
            if element.type != "Reference":
                self.errors.append(row.where.error(
                    f"type mismatch: {row.target} is {element.type}, not a Reference"))
            elif element.reference_targets and reference.group(1) not in \
                    element.reference_targets:
                self.errors.append(row.where.error(
                    f"type mismatch: {row.target} may not refer to {reference.group(1)} "
                    f"(only {', '.join(element.reference_targets)})"))
        elif declared != element.type and not (declared == "string" and
                                               element.type == "base64Binary"):
            self.errors.append(row.where.error(
                f"type mismatch: {row.target} is {element.type}, the row says "
                f"'{declared or '(empty)'}'"))
        return element

    def _condition(self, text: str, table: FieldMap, source: V2Path | None,
                   where: Where) -> Callable[[Scope], bool] | None:
        if not text:
            return None

        def getter_for(path_text: str) -> Getter:
            path = self._parse_v2_path(path_text, table, where)
            if path is None:
                raise ConditionError(f"unknown location '{path_text}'")
            return self._getter(path, table)  # type: ignore[return-value]

        try:
            predicate = compile_condition(text, getter_for)
        except ConditionError as exc:
            self.errors.append(where.error(f"condition: {exc}"))
            return None
        return predicate

    def _getter(self, path: V2Path, table: FieldMap) -> Callable[[Scope], str]:
        """Read a location as unescaped text, for conditions and value templates."""
        if table.kind == "datatype":
            index = path.field - 1
            sub = path.component

            def component(scope: Scope) -> str:
                parts = scope.parts
                raw = parts[index] if index < len(parts) else ""
                if sub:
                    raw = _sub(raw, scope.seps, sub)
                raw = "" if raw == _NULL else raw
                return scope.run.text(raw)
            return component

        f, c, s = path.field, path.component, path.subcomponent
        if path.segment != table.v2_type:
            segment_id = path.segment

            def other(scope: Scope) -> str:
                segment = scope.run.latest.get(segment_id) or scope.run.message.segment(
                    segment_id)
                if segment is None:
                    return ""
                raw = _descend(_first_rep(segment.field(f), scope.run), scope.run, c, s)
                return "" if raw == _NULL else scope.run.text(raw)
            return other

        key = (f, c, s)

        def own(scope: Scope) -> str:
            if scope.rep_field == f:
                raw = _descend(scope.rep, scope.run, c, s)
                return "" if raw == _NULL else scope.run.text(raw)
            # Another field of this segment does not change while the segment is mapped,
            # and conditions read the same one over and over (OBX-2 for every value row).
            memo = scope.memo
            value = memo.get(key)
            if value is None:
                parts = scope.parts
                raw = _first_rep(parts[f] if f < len(parts) else "", scope.run)
                raw = _descend(raw, scope.run, c, s)
                # The explicit null "" is no value: not VALUED, and nothing for a template.
                value = memo[key] = "" if raw == _NULL else scope.run.text(raw)
            return value
        return own

    # -- producing a value ---------------------------------------------------------------

    def _producer(self, row: MapRow, table: FieldMap, source: V2Path | None,
                  element: fhir_model.Element | None
                  ) -> Callable[[Scope, str, str, str], Any] | None:
        where = row.where
        if element is None:
            return None
        vocab = None
        if row.vocabulary:
            vocab = self.vocabs.get(row.vocabulary)
            if vocab is None:
                self.errors.append(where.error(f"unknown vocabulary '{row.vocabulary}'"))
                return None
        if row.value:
            return self._constant(row, table, element, vocab)
        if source is None:
            self.errors.append(where.error("a row needs a source or a value"))
            return None
        if row.map:
            return self._mapped(row, element, vocab)
        if not element.is_primitive:
            self.errors.append(where.error(
                f"{row.target} is a {element.type}: name the data-type map to apply"))
            return None
        return self._primitive(row, element, vocab)

    def _constant(self, row: MapRow, table: FieldMap, element: fhir_model.Element,
                  vocab: Vocab | None) -> Callable[[Scope, str, str, str], Any] | None:
        where = row.where
        if not element.is_primitive:
            self.errors.append(where.error(f"a value can only be assigned to a primitive; "
                                           f"{row.target} is {element.type}"))
            return None
        convert = self.converters.for_type(element.type)
        placeholders = _PLACEHOLDER.findall(row.value)
        if not placeholders:
            try:
                constant = convert(row.value)
            except ConversionError as exc:
                self.errors.append(where.error(f"value '{row.value}' {exc.reason}"))
                return None
            if element.codes and constant not in element.codes:
                self.errors.append(where.error(
                    f"type mismatch: '{constant}' is not one of the codes of {row.target} "
                    f"({', '.join(element.codes)})"))
                return None
            return lambda scope, raw, seps, location: constant
        getters: list[Callable[[Scope], str]] = []
        for text in placeholders:
            path = self._parse_v2_path(text, table, where)
            if path is None:
                return None
            getters.append(self._getter(path, table))
        pieces = _PLACEHOLDER.split(row.value)  # literal, name, literal, name, ..., literal

        def template(scope: Scope, raw: str, seps: str, location: str) -> Any:
            values = [g(scope) for g in getters]
            if not all(values):
                return None  # a template is only as good as every value it quotes
            text = "".join(p if i % 2 == 0 else values[i // 2] for i, p in enumerate(pieces))
            return _converted(convert, text, location)
        return template

    def _primitive(self, row: MapRow, element: fhir_model.Element, vocab: Vocab | None
                   ) -> Callable[[Scope, str, str, str], Any] | None:
        try:
            # `string` declared for a base64Binary target: the v2 value is text (a TX
            # line, ED sent as ASCII), so it is encoded rather than checked as base64.
            convert = encode_base64 if element.type == "base64Binary" and \
                row.type == "string" else self.converters.for_type(element.type)
        except KeyError as exc:
            self.errors.append(row.where.error(str(exc.args[0])))
            return None
        codes = frozenset(element.codes)
        target = row.target
        if vocab is not None:
            # A wildcard row (`*` -> unknown) gives its code as surely as an exact one does;
            # only a code built from the message ({*}, {code}) is checked per message.
            given = [*vocab.exact.values(), *(t for _, t in vocab.prefixes)]
            bad = [c for c, _, _ in given if codes and c not in codes and "{" not in c]
            if bad:
                self.errors.append(row.where.error(
                    f"type mismatch: vocabulary {vocab.name} gives {bad[0]!r}, which is not "
                    f"a code of {target} ({', '.join(sorted(codes))})"))
                return None

        zoned = element.type in ("dateTime", "instant")
        kind = element.type
        if convert is to_string and vocab is None and not codes:
            def produce_text(scope: Scope, raw: str, seps: str, location: str) -> Any:
                # Most rows are plain text: nothing to convert, look up or check.
                text = leaf(raw, seps) if seps else raw
                if not text or text == _NULL:
                    return None
                return scope.run.text(text)
            produce_text.plain_text = True  # type: ignore[attr-defined]
            return produce_text

        def produce(scope: Scope, raw: str, seps: str, location: str) -> Any:
            text = leaf(raw, seps) if seps else raw
            if not text or text == _NULL:
                return None
            text = scope.run.text(text)
            if text.isspace():
                return None  # padding only: not a value (a code or date cannot be blank)
            if zoned:
                try:
                    return date_time(text, scope.run.offset, kind)
                except ConversionError as exc:
                    raise TranslationError(location, exc.reason, text) from None
            if vocab is not None:
                hit = vocab.lookup(text)
                if hit is not None:
                    text = hit[0]
            if codes and text not in codes:
                # A code the element's required binding does not allow cannot be sent as
                # is; it is left out and counted, never silently invented or dropped.
                scope.run.unmapped[location] += 1
                return None
            return _converted(convert, text, location)
        return produce

    def _mapped(self, row: MapRow, element: fhir_model.Element, vocab: Vocab | None
                ) -> Callable[[Scope, str, str, str], Any] | None:
        fn = self.datatype(row.map, row.where)
        table = self.tables.datatypes.get(row.map)
        if fn is None or table is None:
            return None
        produced = table.target_type
        makes_resource = fhir_model.is_resource_type(produced)
        if makes_resource:
            if element.type != "Reference" or (element.reference_targets and
                                               produced not in element.reference_targets):
                self.errors.append(row.where.error(
                    f"type mismatch: map {row.map} makes a {produced}; {row.target} "
                    f"cannot refer to it"))
                return None
        elif produced != element.type and not (
                element.is_primitive and produced in fhir_model.PRIMITIVE_TYPES):
            self.errors.append(row.where.error(
                f"type mismatch: map {row.map} makes {produced}; {row.target} is "
                f"{element.type}"))
            return None
        recode = _recoder(vocab, element.type) if vocab is not None else None
        if vocab is not None and recode is None:
            self.errors.append(row.where.error(
                f"a vocabulary applies to a code, Coding or CodeableConcept, not "
                f"{element.type}"))
            return None
        resource_type = produced

        def produce(scope: Scope, raw: str, seps: str, location: str) -> Any:
            if not raw or raw == _NULL:
                return None
            if seps:
                parts = raw.split(seps[0])
                below = seps[1:]
            else:
                parts, below = [raw], ""
            value = fn(parts, below, scope.run, location)
            if value is None:
                return None
            if recode is not None:
                value = recode(value, location)
            if makes_resource:
                return scope.run.reference_to(resource_type, value)
            return value
        return produce

    # -- a group of rows with one source --------------------------------------------------

    def _group(self, table: FieldMap, source: V2Path | None, rows: list[Row],
               count_unmatched: bool = False) -> Group:
        if source is None:
            def constants(scope: Scope, inst: dict[str, Json], out: Json,
                          location: str) -> None:
                scope.rep_tag, scope.src_tag = "#1", "@#1"
                for row in rows:
                    row(scope, "", "", location, inst, out)
            return constants

        if table.kind == "datatype":
            index = source.field - 1
            sub = source.component
            suffix = f".{source.field}" + (f".{sub}" if sub else "")
            src_tag = f"@{suffix}#1"

            def components(scope: Scope, inst: dict[str, Json], out: Json,
                           location: str) -> None:
                parts = scope.parts
                raw = parts[index] if index < len(parts) else ""
                seps = scope.seps
                if sub:
                    raw = _sub(raw, seps, sub)
                    seps = seps[1:]
                if not raw or raw == _NULL:
                    return
                scope.rep_tag, scope.src_tag = "#1", src_tag
                here = location + suffix
                for row in rows:
                    row(scope, raw, seps, here, inst, out)
            return components

        f, c, s = source.field, source.component, source.subcomponent
        location = str(source)
        if source.segment != table.v2_type:
            segment_id = source.segment
            other_tag = f"@{location}#1"

            def elsewhere(scope: Scope, inst: dict[str, Json], out: Json, _: str) -> None:
                segment = scope.run.latest.get(segment_id) or scope.run.message.segment(
                    segment_id)
                if segment is None:
                    return
                run = scope.run
                raw = _descend(_first_rep(segment.field(f), run), run, c, s)
                if not raw or raw == _NULL:
                    return
                scope.rep_tag, scope.src_tag = "#1", other_tag
                for row in rows:
                    row(scope, raw, _below(run, c, s), location, inst, out)
            return elsewhere

        tags = [(f"#{n}", f"@{location}#{n}") for n in range(1, 101)]

        def repetitions(scope: Scope, inst: dict[str, Json], out: Json, _: str) -> None:
            fields = scope.parts
            field = fields[f] if f < len(fields) else ""
            if not field or field == _NULL:
                return
            run = scope.run
            repetition = run.d.repetition
            reps = field.split(repetition) if repetition in field else (field,)
            seps = _below(run, c, s)
            scope.rep_field = f
            for n, rep in enumerate(reps):
                raw = _descend(rep, run, c, s) if c else rep
                if not raw or raw == _NULL:
                    continue
                scope.rep = rep
                scope.rep_tag, scope.src_tag = tags[n] if n < 100 else (
                    f"#{n + 1}", f"@{location}#{n + 1}")
                if count_unmatched:
                    applied = False
                    for row in rows:
                        applied = row(scope, raw, seps, location, inst, out) or applied
                    if not applied:
                        run.unmapped[location] += 1
                else:
                    for row in rows:
                        row(scope, raw, seps, location, inst, out)
            scope.rep_field = 0
        return repetitions

    # -- setters -----------------------------------------------------------------------------

    def _setter(self, table: FieldMap, row: MapRow) -> Setter | None:
        if row.target == "$value":
            def set_value(out: Json, inst: dict[str, Json], rep_tag: str, src_tag: str,
                          value: Any) -> None:
                out.setdefault("$value", value)
            return set_value
        try:
            return compile_setter(table.target_type, row.target)
        except (fhir_model.UnknownElement, ValueError):
            return None  # reported by _target_element

    # -- message maps ----------------------------------------------------------------------

    def _message(self, table: MessageMap) -> MessageFn:
        by_segment: dict[str, list[_MessageStep]] = {}
        for row in table.rows:
            step = self._message_step(row)
            if step is not None:
                by_segment.setdefault(row.segment, []).append(step)
        return _message_fn(by_segment)

    def _message_step(self, row: MessageRow) -> _MessageStep | None:
        where = row.where
        before = len(self.errors)
        if not self._known_segment(row.segment):
            self.errors.append(where.error(f"unknown HL7 v2 segment '{row.segment}'"))
        if row.after and not self._known_segment(row.after):
            self.errors.append(where.error(f"after: unknown HL7 v2 segment '{row.after}'"))
        if row.instance not in ("new", "current"):
            self.errors.append(where.error("instance must be 'new' or 'current'"))
        if not fhir_model.is_resource_type(row.resource):
            self.errors.append(where.error(f"'{row.resource}' is not a FHIR resource type"))
            return None
        compiled = self.segment(row.map, where)
        table = self.tables.segments.get(row.map)
        if compiled is None or table is None:
            return None
        if table.target_type != row.resource:
            self.errors.append(where.error(
                f"map {row.map} writes a {table.target_type}, not a {row.resource}"))
        if table.v2_type != row.segment:
            self.errors.append(where.error(f"map {row.map} reads {table.v2_type}, "
                                           f"not {row.segment}"))
        links = self._links(row)
        condition = None
        if row.condition:
            condition = self._condition(row.condition, table, None, where)
        if len(self.errors) > before:
            return None
        fn, read = compiled
        return _MessageStep(row.resource, row.instance == "current", row.after, fn, read,
                            links, condition)

    def _links(self, row: MessageRow) -> list[_Link]:
        links: list[_Link] = []
        for text in filter(None, (t.strip() for t in row.links.split(";"))):
            match = _LINK.match(text)
            if match is None:
                self.errors.append(row.where.error(
                    f"link '{text}' must look like subject=Patient, "
                    f"DiagnosticReport.result+=this or link.type=\"replaces\""))
                continue
            owner, path, operator, value = match.groups()
            on_type = owner or row.resource
            try:
                element = fhir_model.element(on_type, path)
                setter = compile_setter(on_type, path)
            except (fhir_model.UnknownElement, ValueError) as exc:
                self.errors.append(row.where.error(f"link '{text}': {exc}"))
                continue
            if value.startswith('"') and value.endswith('"'):
                constant: Any = value[1:-1]
                if element.codes and constant not in element.codes:
                    self.errors.append(row.where.error(
                        f"link '{text}': not one of {', '.join(element.codes)}"))
                    continue
                links.append(_Link(owner, setter, None, constant))
                continue
            refers_to = row.resource if value == "this" else value
            if element.type != "Reference":
                self.errors.append(row.where.error(f"link '{text}': {path} is "
                                                   f"{element.type}, not a Reference"))
                continue
            if element.reference_targets and refers_to not in element.reference_targets:
                self.errors.append(row.where.error(
                    f"link '{text}': {path} may not refer to {refers_to}"))
                continue
            links.append(_Link(owner, setter, "this" if value == "this" else value, None))
        return links


@dataclass(frozen=True, slots=True)
class _Link:
    owner: str | None  # None: the new resource; a type: the current resource of that type
    setter: Setter
    refers_to: str | None  # "this", a resource type, or None for a constant
    constant: Any


@dataclass(frozen=True, slots=True)
class _MessageStep:
    resource: str
    into_current: bool
    after: str
    apply: SegmentFn
    read: frozenset[int]
    links: list[_Link]
    condition: Callable[[Scope], bool] | None


def _message_fn(by_segment: dict[str, list[_MessageStep]]) -> MessageFn:
    def translate(run: Run) -> None:
        last_id = ""
        anchor = ""
        for segment in run.message.segments():
            segment_id = segment.id
            # Another segment's field is read from its nearest occurrence so far (the OBR
            # above an OBX), so each occurrence is remembered as it goes by.
            run.latest[segment_id] = segment
            if segment_id != last_id:
                anchor, last_id = last_id, segment_id
            steps = by_segment.get(segment_id)
            if steps is None:
                if segment_id.startswith("Z"):
                    run.z_segments += 1
                elif segment_id != "MSH":
                    run.unmapped[segment_id] += 1
                continue
            fields = segment.fields
            read: set[int] = set()
            applied = False
            try:
                for step in steps:
                    if step.after and step.after != anchor:
                        continue
                    if step.condition is not None and not step.condition(
                            Scope(fields, "", run)):
                        continue
                    _apply_step(step, fields, run)
                    read |= step.read
                    applied = True
            except TranslationError as exc:
                exc.sequence = segment.occurrence
                raise
            if not applied:  # rows exist, but none for this place in the message
                if segment_id.startswith("Z"):
                    run.z_segments += 1
                else:
                    run.unmapped[segment_id] += 1
                continue
            if read:
                for number in range(1, len(fields)):
                    value = fields[number]
                    if value and number not in read and not (segment_id == "MSH" and
                                                             number <= 2):
                        run.unmapped[f"{segment_id}-{number}"] += 1
    return translate


def _apply_step(step: _MessageStep, fields: list[str], run: Run) -> None:
    draft = run.current.get(step.resource) if step.into_current else None
    if draft is not None:
        step.apply(fields, run, draft.content)
        return
    content: Json = {}
    step.apply(fields, run, content)
    if not content:
        # An empty segment makes no resource, and ends the previous one's turn: the RXE
        # after an empty ORC must not write into the order before it.
        run.current.pop(step.resource, None)
        return
    draft = run.new_draft(step.resource)
    draft.content = content
    # One instance map per owner: the links of a row that write one owner's repeating
    # element (Patient.link.other and Patient.link.type) fill one instance of it.
    insts: dict[int, dict[str, Json]] = {}
    for link in step.links:
        owner = draft if link.owner is None else run.current.get(link.owner)
        if owner is None:
            continue
        inst = insts.setdefault(id(owner), {})
        if link.refers_to is None:
            link.setter(owner.content, inst, "", "", link.constant)
            continue
        target = draft if link.refers_to == "this" else run.current.get(link.refers_to)
        if target is None or target is owner:
            continue
        link.setter(owner.content, inst, "", "", run.reference(target))
    run.current[step.resource] = draft


def _converted(convert: Callable[[str], Any], text: str, location: str) -> Any:
    """The converted value, or a TranslationError naming where (and, for the CLI, what)."""
    try:
        return convert(text)
    except ConversionError as exc:
        raise TranslationError(location, exc.reason, text) from None


def _first_rep(field: str, run: Run) -> str:
    rep = run.d.repetition
    return field.split(rep, 1)[0] if rep in field else field


def _descend(raw: str, run: Run, component: int, subcomponent: int) -> str:
    if component:
        parts = raw.split(run.d.component)
        raw = parts[component - 1] if component <= len(parts) else ""
        if subcomponent:
            pieces = raw.split(run.d.subcomponent)
            raw = pieces[subcomponent - 1] if subcomponent <= len(pieces) else ""
    return raw


def _sub(raw: str, seps: str, position: int) -> str:
    """The position-th part one level down; with no level left the value is its own first."""
    if not seps:
        return raw if position == 1 else ""
    pieces = raw.split(seps[0])
    return pieces[position - 1] if position <= len(pieces) else ""


def _below(run: Run, component: int, subcomponent: int) -> str:
    if subcomponent:
        return ""
    if component:
        return run.d.subcomponent
    return run.d.component + run.d.subcomponent


def _first_repeating(root: str, path: str) -> tuple[str, bool] | None:
    """The path prefix up to the first repeating element, and whether it is indexed."""
    node_type = root
    prefix = ""
    indexed = False
    for part in path.split("."):
        match = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)(?:\[(\d+)\])?", part)
        if match is None:
            return None
        indexed = indexed or match.group(2) is not None
        try:
            element = fhir_model.element(node_type, match.group(1))
        except fhir_model.UnknownElement:
            return None
        prefix = f"{prefix}.{part}" if prefix else part
        if element.repeats:
            return prefix, indexed
        node_type = element.type
    return None


def _only_into_existing(row: Row, first: tuple[str, bool] | None) -> Row:
    assert first is not None
    prefix, indexed = first

    def apply(scope: Scope, raw: str, seps: str, location: str, inst: dict[str, Json],
              out: Json) -> bool:
        if prefix + (scope.rep_tag if indexed else scope.src_tag) not in inst:
            return False
        return row(scope, raw, seps, location, inst, out)
    return apply


def _strip_indexes(path: str) -> str:
    return re.sub(r"\[\d+\]", "", path)


def compile_setter(root: str, path: str) -> Setter:
    """A function that writes a value at `path` below a JSON object.

    A repeating element gets one instance per source repetition, shared by the rows of that
    source (key: path prefix + source tag); an indexed one (`coding[1]`) is shared by every
    row of the repetition, whatever its source (key: path prefix + repetition tag). A
    primitive's extension goes in its `_name` twin, as FHIR JSON requires. A single value
    that is already set is kept: the first row to write it wins.
    """
    steps: list[tuple[str, str, bool, bool]] = []  # (json key, prefix, repeats, indexed)
    node_type = root
    prefix = ""
    indexed = False
    parts = path.split(".")
    for i, part in enumerate(parts):
        match = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)(?:\[(\d+)\])?", part)
        if match is None:
            raise ValueError(f"'{part}' is not an element name")
        name = match.group(1)
        indexed = indexed or match.group(2) is not None
        element = fhir_model.element(node_type, name)
        prefix = f"{prefix}.{part}" if prefix else part
        key = name
        if element.is_primitive and i + 1 < len(parts):
            key = "_" + name  # the primitive's element twin carries id/extension
            element = fhir_model.Element("Element", element.repeats)
        steps.append((key, prefix, element.repeats, indexed))
        node_type = element.type
    *walk, (last_key, last_prefix, last_repeats, last_indexed) = steps
    if not walk and not last_repeats:
        # The most common shape (gender, birthDate, status): one single-valued element.
        def set_single(node: Json, inst: dict[str, Json], rep_tag: str, src_tag: str,
                       value: Any) -> None:
            current = node.get(last_key)
            if current is None:
                node[last_key] = value
            elif isinstance(current, dict) and isinstance(value, dict):
                _fill(current, value)
        return set_single

    def set_value(node: Json, inst: dict[str, Json], rep_tag: str, src_tag: str,
                  value: Any) -> None:
        for key, step_prefix, repeats, step_indexed in walk:
            if repeats:
                scope_key = step_prefix + (rep_tag if step_indexed else src_tag)
                child = inst.get(scope_key)
                if child is None:
                    child = {}
                    node.setdefault(key, []).append(child)
                    inst[scope_key] = child
            else:
                child = node.get(key)
                if child is None:
                    child = node[key] = {}
            node = child
        if last_repeats:
            if isinstance(value, dict):
                scope_key = last_prefix + (rep_tag if last_indexed else src_tag)
                existing = inst.get(scope_key)
                if existing is not None:
                    _fill(existing, value)
                    return
                inst[scope_key] = value
            node.setdefault(last_key, []).append(value)
        else:
            current = node.get(last_key)
            if current is None:
                node[last_key] = value
            elif isinstance(current, dict) and isinstance(value, dict):
                _fill(current, value)
    return set_value


def _fill(into: Json, value: Json) -> None:
    for key, item in value.items():
        if key not in into:
            into[key] = item
        elif isinstance(into[key], list) and isinstance(item, list):
            into[key].extend(item)


def _recoder(vocab: Vocab, element_type: str) -> Callable[[Any, str], Any] | None:
    """Translate the first coding of a Coding/CodeableConcept through a vocabulary,
    keeping the sender's own coding after the translated one."""
    def recode_coding(coding: Json) -> list[Json]:
        code = coding.get("code")
        if not code:
            return [coding]
        hit = vocab.lookup(code)
        if hit is None:
            return [coding]
        fhir_code, display, system = hit
        translated: Json = {"code": fhir_code}
        if system:
            translated = {"system": system, "code": fhir_code}
        if display:
            translated["display"] = display
        if translated.get("system") == coding.get("system") and fhir_code == code:
            return [{**coding, **translated}]
        return [translated, coding]

    if element_type == "CodeableConcept":
        def concept(value: Any, location: str) -> Any:
            codings = value.get("coding")
            if codings:
                value["coding"] = recode_coding(codings[0]) + codings[1:]
            return value
        return concept
    if element_type == "Coding":
        return lambda value, location: recode_coding(value)[0]
    if element_type == "code":
        def code(value: Any, location: str) -> Any:
            hit = vocab.lookup(value)
            return hit[0] if hit is not None else value
        return code
    return None
