"""One table row compiled: read its value, check its condition, write its target.

Rows sharing a source run together (the group, in segments.py); each is a closure that
turns the raw text at the group's place into a value (datatypes.py) and writes it with a
FHIR path setter (setters.py). The commonest shapes are fused into one call.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.fhir import model as fhir_model
from gateway.mapping.compiler.context import Context, Row, TableLocation
from gateway.mapping.compiler.datatypes import Producers
from gateway.mapping.compiler.setters import (
    Setter,
    compile_setter,
    first_repeating,
    strip_indexes,
)
from gateway.mapping.runtime import NULL, Json, Scope, described, leaf
from gateway.mapping.tables import FieldMap, MapRow

_REFERENCE_TYPE = re.compile(r"Reference\(([A-Za-z]+)\)$")


class RowCompiler:
    """Compiles the rows of segment and data-type tables."""

    def __init__(self, ctx: Context, producers: Producers) -> None:
        self.ctx = ctx
        self.producers = producers

    def rows(self, rows: list[MapRow], table: FieldMap,
             path: TableLocation | None) -> list[Row]:
        """Value rows first, then constants. A constant for an element that a value row of
        the group makes (location.status beside location.location) only fills that
        element in when it exists: it never makes a half element of its own."""
        values = [r for r in rows if not r.value or "{" in r.value]
        constants = [r for r in rows if r.value and "{" not in r.value]
        made = {first for r in values if r.target
                if (first := first_repeating(table.target_type, r.target)) is not None}
        compiled: list[Row] = []
        for row in values:
            applied = self._row(row, table, path)
            if applied is not None:
                compiled.append(applied)
        for row in constants:
            applied = self._row(row, table, path)
            if applied is None:
                continue
            first = first_repeating(table.target_type, row.target) if row.target else None
            compiled.append(_only_into_existing(applied, first) if first in made else applied)
        return compiled

    def _row(self, row: MapRow, table: FieldMap, source: TableLocation | None) -> Row | None:
        before = len(self.ctx.errors)
        where = row.where
        if not row.target:
            if row.value or row.map:
                self.ctx.errors.append(where.error("a row with a map or a value needs a target"))
            return None  # a documentation row: this field is deliberately not mapped
        setter = self._setter(table, row)
        element = self._target_element(table, row)
        condition = self.ctx.condition(row.condition, table, where)
        produce = self.producers.producer(row, table, source, element)
        if len(self.ctx.errors) > before or setter is None or produce is None:
            return None

        if condition is None and getattr(produce, "plain_text", False):
            def apply(scope: Scope, raw: str, seps: str, location: str,
                      inst: dict[str, Json], out: Json) -> bool:
                # The commonest row, fused: plain text, no condition (one call, not three).
                text = leaf(raw, seps) if seps else raw
                if text and text != NULL:
                    setter(out, inst, scope.rep_tag, scope.src_tag, scope.run.text(text))
                return True
            return described(apply, "row_text", setter)
        elif condition is None:
            def apply(scope: Scope, raw: str, seps: str, location: str,
                      inst: dict[str, Json], out: Json) -> bool:
                value = produce(scope, raw, seps, location)
                if value is not None:
                    setter(out, inst, scope.rep_tag, scope.src_tag, value)
                return True
            return described(apply, "row", None, produce, setter)
        else:
            def apply(scope: Scope, raw: str, seps: str, location: str,
                      inst: dict[str, Json], out: Json) -> bool:
                if not condition(scope):
                    return False
                value = produce(scope, raw, seps, location)
                if value is not None:
                    setter(out, inst, scope.rep_tag, scope.src_tag, value)
                return True
            return described(apply, "row", condition, produce, setter)

    def _target_element(self, table: FieldMap, row: MapRow) -> fhir_model.Element | None:
        if row.target == "$value":
            if table.target_type not in fhir_model.PRIMITIVE_TYPES:
                self.ctx.errors.append(row.where.error(
                    f"$value is only for tables whose target is a primitive, not "
                    f"{table.target_type}"))
                return None
            return fhir_model.Element(table.target_type, False)
        try:
            element = fhir_model.element(table.target_type, strip_indexes(row.target))
        except fhir_model.UnknownElement as exc:
            self.ctx.errors.append(row.where.error(
                f"'{row.target}' is not an element of {table.target_type}: {exc}"))
            return None
        declared = row.type
        reference = _REFERENCE_TYPE.match(declared)
        if reference is not None:
            if element.type != "Reference":
                self.ctx.errors.append(row.where.error(
                    f"type mismatch: {row.target} is {element.type}, not a Reference"))
            elif element.reference_targets and reference.group(1) not in \
                    element.reference_targets:
                self.ctx.errors.append(row.where.error(
                    f"type mismatch: {row.target} may not refer to {reference.group(1)} "
                    f"(only {', '.join(element.reference_targets)})"))
        elif declared != element.type and not (declared == "string" and
                                               element.type == "base64Binary"):
            self.ctx.errors.append(row.where.error(
                f"type mismatch: {row.target} is {element.type}, the row says "
                f"'{declared or '(empty)'}'"))
        return element

    def _setter(self, table: FieldMap, row: MapRow) -> Setter | None:
        if row.target == "$value":
            def set_value(out: Json, inst: dict[str, Json], rep_tag: str, src_tag: str,
                          value: Any) -> None:
                out.setdefault("$value", value)
            return described(set_value, "set_value")
        try:
            return compile_setter(table.target_type, row.target)
        except (fhir_model.UnknownElement, ValueError):
            return None  # reported by _target_element


def _only_into_existing(row: Row, first: tuple[str, bool] | None) -> Row:
    assert first is not None
    prefix, indexed = first

    def apply(scope: Scope, raw: str, seps: str, location: str, inst: dict[str, Json],
              out: Json) -> bool:
        if prefix + (scope.rep_tag if indexed else scope.src_tag) not in inst:
            return False
        return row(scope, raw, seps, location, inst, out)
    return described(apply, "only_existing", row, prefix, indexed)
