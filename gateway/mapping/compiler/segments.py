"""Segment tables (PID-Patient) and data-type tables (CX-Identifier) compiled.

Both are field maps: rows from a v2 source to a FHIR target. Rows sharing a source form a
group, run once per repetition of the field (segment tables) or once per component value
(data-type tables); rows of one source and repetition share the instances they make, so
`name.family` and `name.given` of one XPN fill one HumanName. A group whose part is empty
is never called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from gateway.fhir import model as fhir_model
from gateway.hl7.location import ComponentLocation, Location
from gateway.mapping.compiler.context import Context, Group, Row, TableLocation
from gateway.mapping.compiler.datatypes import (
    DatatypeFn,
    Producers,
    check_datatype_table,
    datatype_function,
)
from gateway.mapping.compiler.rows import RowCompiler
from gateway.mapping.compiler.setters import strip_indexes
from gateway.mapping.runtime import (
    NULL,
    Json,
    Run,
    Scope,
    descend,
    described,
    first_repetition,
    part_below,
    separators_below,
)
from gateway.mapping.tables import FieldMap, MapRow, Where

# (the segment's fields, the run, the resource content being written)
SegmentFn = Callable[[list[str], Run, Json], None]
# The source of rows that read a data type's whole value (`PL` in a PL table).
WHOLE = object()


class FieldMaps:
    """The segment and data-type tables of a table set, each compiled once, on first use
    (a data-type table when the first row naming it is compiled)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.datatype_fns: dict[str, DatatypeFn] = {}
        self.segment_fns: dict[str, tuple[SegmentFn, frozenset[int]]] = {}
        self._compiling: set[str] = set()
        self.row_compiler = RowCompiler(ctx, Producers(ctx, self.datatype))

    def datatype(self, name: str, where: Where) -> DatatypeFn | None:
        """The compiled data-type table `name` (compiled on first use)."""
        if name in self.datatype_fns:
            return self.datatype_fns[name]
        table = self.ctx.tables.datatypes.get(name)
        if table is None:
            self.ctx.errors.append(where.error(f"unknown data-type map '{name}'"))
            return None
        if name in self._compiling:
            self.ctx.errors.append(where.error(f"data-type map '{name}' refers to itself"))
            return None
        self._compiling.add(name)
        try:
            check_datatype_table(self.ctx, table)
            fn = datatype_function(table, self._groups(table))
        finally:
            self._compiling.discard(name)
        self.datatype_fns[name] = fn
        return fn

    def segment(self, name: str, where: Where) -> tuple[SegmentFn, frozenset[int]] | None:
        if name in self.segment_fns:
            return self.segment_fns[name]
        table = self.ctx.tables.segments.get(name)
        if table is None:
            self.ctx.errors.append(where.error(f"unknown segment map '{name}'"))
            return None
        where0 = Where(table.file, 1)
        if not self.ctx.known_segment(table.v2_type):
            self.ctx.errors.append(where0.error(f"unknown HL7 v2 segment '{table.v2_type}'"))
        if not fhir_model.is_resource_type(table.target_type):
            self.ctx.errors.append(where0.error(
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

        self.segment_fns[name] = (described(apply, "segment", name, segment_id, groups), read)
        return self.segment_fns[name]

    def _fields_read(self, table: FieldMap) -> Iterable[int]:
        for row in table.rows:
            found = self.ctx.location(row.source, table, row.where, quiet=True)
            if isinstance(found, Location) and found.segment == table.v2_type:
                assert found.field is not None
                yield found.field

    def _groups(self, table: FieldMap) -> list[tuple[int, Group]]:
        """Groups in table order, each with the index of the part it reads (-1: always run)."""
        indexed = []
        for source, group in self._source_groups(table):
            if source is WHOLE:
                index = -1
            elif source is None or (isinstance(source, Location) and
                                  source.segment != table.v2_type):
                index = -1
            elif isinstance(source, ComponentLocation):
                index = source.component - 1
            else:
                assert isinstance(source, Location) and source.field is not None
                index = source.field
            indexed.append((index, group))
        return indexed

    def _source_groups(self, table: FieldMap
                       ) -> list[tuple[TableLocation | object | None, Group]]:
        """Rows sharing a source run together per repetition, sharing new instances."""
        by_source: dict[str, list[MapRow]] = {}
        for row in table.rows:
            by_source.setdefault(row.source, []).append(row)
        self._check_duplicates(table)
        groups = []
        for source, rows in by_source.items():
            if table.kind == "datatype" and source == table.v2_type:
                # The whole value (`PL` in PL-Location): handed as it is to another
                # data-type table, e.g. the Location one level up a PL's hierarchy.
                whole = ComponentLocation(table.v2_type, 0, None)
                compiled = self.row_compiler.rows(rows, table, whole)
                groups.append((WHOLE, _whole(compiled)))
                continue
            path = self.ctx.location(source, table, rows[0].where) if source else None
            if source and path is None:
                continue
            compiled = self.row_compiler.rows(rows, table, path)
            compiled += self._left_out_when(rows, table)
            # A field whose every row is conditional is counted as unmapped when none
            # applies, unless a documentation row (no target) says it may be left out:
            # always, or when its own condition holds.
            count_unmatched = bool(compiled) and all(r.condition for r in rows)
            groups.append((path, self._group(table, path, compiled, count_unmatched)))
        return groups

    def _left_out_when(self, rows: list[MapRow], table: FieldMap) -> list[Row]:
        """Documentation rows with a condition (`OBX-6` of several numbers, whose units the
        components carry): the field counts as mapped when the condition holds."""
        left_out: list[Row] = []
        for row in rows:
            if row.target or not row.condition or row.value or row.map:
                continue
            holds = self.ctx.condition(row.condition, table, row.where)
            if holds is not None:
                left_out.append(_applies_when(holds))
        return left_out

    def _check_duplicates(self, table: FieldMap) -> None:
        seen: dict[tuple[str, str, str, str], MapRow] = {}
        single: dict[tuple[str, str], MapRow] = {}
        for row in table.rows:
            key = (row.source, row.condition, row.target, row.value)
            if key in seen:
                self.ctx.errors.append(row.where.error(
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
                self.ctx.errors.append(row.where.error(
                    f"contradicts line {other.where.line}: both set {row.target} "
                    "unconditionally"))
            single[(row.target, row.source)] = row

    def _element_or_none(self, root: str, target: str) -> fhir_model.Element | None:
        if target == "$value":
            return None
        try:
            return fhir_model.element(root, strip_indexes(target))
        except fhir_model.UnknownElement:
            return None

    def _group(self, table: FieldMap, source: TableLocation | None, rows: list[Row],
               count_unmatched: bool = False) -> Group:
        if source is None:
            def constants(scope: Scope, inst: dict[str, Json], out: Json,
                          location: str) -> None:
                scope.rep_tag, scope.src_tag = "#1", "@#1"
                for row in rows:
                    row(scope, "", "", location, inst, out)
            return described(constants, "constants", rows)

        if isinstance(source, ComponentLocation):
            index = source.component - 1
            sub = source.subcomponent or 0
            suffix = f".{source.component}" + (f".{sub}" if sub else "")
            src_tag = f"@{suffix}#1"

            def components(scope: Scope, inst: dict[str, Json], out: Json,
                           location: str) -> None:
                parts = scope.parts
                raw = parts[index] if index < len(parts) else ""
                seps = scope.seps
                if sub:
                    raw = part_below(raw, seps, sub)
                    seps = seps[1:]
                if not raw or raw == NULL:
                    return
                scope.rep_tag, scope.src_tag = "#1", src_tag
                here = location + suffix
                for row in rows:
                    row(scope, raw, seps, here, inst, out)
            return described(components, "components", index, sub, suffix, src_tag, rows)

        assert source.field is not None
        f, c, s = source.field, source.component or 0, source.subcomponent or 0
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
                raw = descend(first_repetition(segment.field(f), run), run, c, s)
                if not raw or raw == NULL:
                    return
                scope.rep_tag, scope.src_tag = "#1", other_tag
                for row in rows:
                    row(scope, raw, separators_below(run, c, s), location, inst, out)
            return described(elsewhere, "elsewhere", segment_id, f, c, s, location, other_tag,
                             rows)

        tags = [(f"#{n}", f"@{location}#{n}") for n in range(1, 101)]
        only = source.repetition

        def repetitions(scope: Scope, inst: dict[str, Json], out: Json, _: str) -> None:
            fields = scope.parts
            field = fields[f] if f < len(fields) else ""
            if not field or field == NULL:
                return
            run = scope.run
            repetition = run.d.repetition
            reps: Sequence[str] = field.split(repetition) if repetition in field else (field,)
            if only is not None:  # `IN1-9(1).1`: that repetition alone
                reps = reps[only - 1:only]
            seps = separators_below(run, c, s)
            scope.rep_field = f
            for n, rep in enumerate(reps):
                raw = descend(rep, run, c, s) if c else rep
                if not raw or raw == NULL:
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
        return described(repetitions, "repetitions", f, c, s, location, only, count_unmatched,
                         rows)


def _whole(rows: list[Row]) -> Group:
    """Rows reading the whole value: the parts joined again by the separator that split
    them (components, or the subcomponents of a component)."""
    def whole(scope: Scope, inst: dict[str, Json], out: Json, location: str) -> None:
        d = scope.run.d
        joiner = d.component if scope.seps else d.subcomponent
        raw = joiner.join(scope.parts)
        seps = joiner + scope.seps
        scope.rep_tag, scope.src_tag = "#1", "@*#1"
        for row in rows:
            row(scope, raw, seps, location, inst, out)
    return described(whole, "whole", rows)


def _applies_when(holds: Callable[[Scope], bool]) -> Row:
    """A row that writes nothing and applies when its condition holds."""
    def row(scope: Scope, raw: str, seps: str, location: str, inst: dict[str, Json],
            out: Json) -> bool:
        return holds(scope)
    return described(row, "applies_when", holds)
