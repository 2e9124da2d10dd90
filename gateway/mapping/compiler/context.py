"""What every part of compiling one table set shares, and the v2 locations rows read.

A table names v2 locations in its sources, conditions and value templates: `PID-3.1` in a
segment table, `CX.4` in a data-type table. Each is checked against the HL7 v2 definitions
when compiled (a problem is collected as `file:line: reason`), then read through a small
function as unescaped text.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.hl7.definitions import definitions
from gateway.hl7.location import ComponentLocation, Location
from gateway.mapping import v2types
from gateway.mapping.conditions import ConditionError, Getter, compile_condition
from gateway.mapping.convert import Converters
from gateway.mapping.errors import TableError
from gateway.mapping.runtime import (
    Json,
    Scope,
    read_component,
    read_other,
    read_own,
    read_repetition,
)
from gateway.mapping.tables import FieldMap, TableSet, Where, source_location
from gateway.mapping.vocabulary import Vocab

_LATEST_V2 = "2.8"

# A location a table row reads: a segment's field (PID-3.1) or a data type's component.
TableLocation = Location | ComponentLocation
# A compiled row: (scope, raw value, separators below it, location, instances made so far,
# the object written) -> whether it applied (its condition held), written or not.
Row = Callable[[Scope, str, str, str, dict[str, Json], Json], bool]
# The rows of one source: (scope, instances made so far, the object written, location).
Group = Callable[[Scope, dict[str, Json], Json, str], None]


class Context:
    """The tables being compiled, the problems found so far, the HL7 v2 definitions the
    locations are checked against, and the compiled vocabularies."""

    def __init__(self, tables: TableSet, converters: Converters) -> None:
        self.tables = tables
        self.converters = converters
        self.errors: list[TableError] = []
        self.v2 = definitions(_LATEST_V2)
        self.vocabs = {name: Vocab(v) for name, v in tables.vocabularies.items()}

    def known_segment(self, segment_id: str) -> bool:
        return segment_id.startswith("Z") or segment_id in self.v2.segment_ids

    def location(self, text: str, table: FieldMap, where: Where,
                 quiet: bool = False) -> TableLocation | None:
        """The location `text` names in `table`, checked; None (and a problem recorded,
        unless `quiet`) when it is not one the table can read."""
        def fail(reason: str) -> None:
            if not quiet:
                self.errors.append(where.error(reason))

        found = source_location(text)
        if isinstance(found, Location):
            assert found.field is not None
            # A data-type table may read a segment's field too, from its nearest occurrence
            # (MSH-23 in the table for MSH-6's facility): what the value is part of.
            segment, number = found.segment, found.field
            if not self.known_segment(segment):
                fail(f"'{text}': unknown segment {segment}")
                return None
            if not segment.startswith("Z"):
                definition = self.v2.segments.get(segment)
                top = max((fd.number for fd in definition.fields), default=0) if definition \
                    else 0
                if number < 1 or number > top:
                    fail(f"'{text}': {segment} has no field {number} (it has {top})")
                    return None
            return found
        if isinstance(found, ComponentLocation):
            if table.kind != "datatype":
                fail(f"'{text}': a segment table reads fields (SEG-n)")
                return None
            datatype, number = found.datatype, found.component
            if datatype != table.v2_type:
                fail(f"'{text}': this table maps {table.v2_type}, not {datatype}")
                return None
            count = v2types.COMPONENTS.get(datatype, 0)
            if number < 1 or number > count:
                fail(f"'{text}': {datatype} has no component {number} (it has {count})")
                return None
            return found
        fail(f"'{text}' is not a v2 location (PID-3, PID-3.1, CX.4)")
        return None

    def condition(self, text: str, table: FieldMap, where: Where
                  ) -> Callable[[Scope], bool] | None:
        """A row's (or a message map row's) condition compiled; None for none, or when it
        does not compile (the problem recorded)."""
        if not text:
            return None

        def getter_for(path_text: str) -> Getter:
            location = self.location(path_text, table, where)
            if location is None:
                raise ConditionError(f"unknown location '{path_text}'")
            return reader(location, table)  # type: ignore[return-value]

        try:
            predicate = compile_condition(text, getter_for)
        except ConditionError as exc:
            self.errors.append(where.error(f"condition: {exc}"))
            return None
        return predicate


def reader(location: TableLocation, table: FieldMap) -> Callable[[Scope], str]:
    """Read a location as unescaped text, for conditions and value templates."""
    if isinstance(location, ComponentLocation):
        return read_component(location.component - 1, location.subcomponent or 0)
    assert location.field is not None
    f, c, s = location.field, location.component or 0, location.subcomponent or 0
    if location.segment != table.v2_type:
        return read_other(location.segment, f, c, s)
    if location.repetition is not None:
        return read_repetition(f, c, s, location.repetition)
    return read_own(f, c, s)
