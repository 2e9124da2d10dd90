"""Identity rules compiled (identities.csv): what makes a resource made from a segment the
same record in every message that carries it.

A resource without a business identifier is otherwise named by its message (sender,
control id, position), so the same result resent under a new MSH-10 would be a second
Observation. A rule names it by what the sender keeps stable instead: an Observation by
the filler order number of its OBR, its OBX-3 and its OBX-4. Rows for one resource and
segment are tried in order; the first whose condition holds and whose key has a value
gives the identity; when none does, the message names the resource as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gateway.fhir import model as fhir_model
from gateway.mapping.compiler.context import Context, reader
from gateway.mapping.runtime import Run, Scope, described
from gateway.mapping.tables import FieldMap, IdentityRow

# (the segment's fields, the run) -> the identity text, or "" when no rule gives one.
IdentityFn = Callable[[list[str], Run], str]
_Rule = tuple[Callable[[Scope], bool] | None, tuple[Callable[[Scope], str], ...]]


def compile_identities(ctx: Context, rows: Sequence[IdentityRow]
                       ) -> dict[tuple[str, str], IdentityFn]:
    """(resource type, segment id) -> its identity function; problems go to ctx.errors."""
    rules: dict[tuple[str, str], list[_Rule]] = {}
    for row in rows:
        before = len(ctx.errors)
        if not fhir_model.is_resource_type(row.resource):
            ctx.errors.append(row.where.error(f"'{row.resource}' is not a FHIR resource type"))
        if not ctx.known_segment(row.segment):
            ctx.errors.append(row.where.error(f"unknown HL7 v2 segment '{row.segment}'"))
        if not row.key:
            ctx.errors.append(row.where.error("key names no v2 location (OBR-3 OBX-3 OBX-4)"))
        if len(ctx.errors) > before:
            continue
        # The locations are read as a segment table for that segment reads them: its own
        # fields, and another segment's from its nearest occurrence before (the OBR above).
        table = FieldMap("identities", "segment", row.segment, row.resource, row.where.file,
                         ())
        parts = []
        for text in row.key:
            location = ctx.location(text, table, row.where)
            if location is not None:
                parts.append(reader(location, table))
        condition = ctx.condition(row.condition, table, row.where)
        if len(ctx.errors) > before:
            continue
        rules.setdefault((row.resource, row.segment), []).append((condition, tuple(parts)))
    return {key: _identity_fn(resource, found) for key in rules
            for resource, found in [(key[0], rules[key])]}


def _identity_fn(resource: str, rules: list[_Rule]) -> IdentityFn:
    def identity(fields: list[str], run: Run) -> str:
        scope = Scope(fields, "", run)
        for condition, parts in rules:
            if condition is not None and not condition(scope):
                continue
            # Trailing empty components are the same value however the sender ends them.
            values = [part(scope).rstrip(run.d.component) for part in parts]
            if any(values):
                return f"{resource}|key|" + "|".join(values)
        return ""
    return described(identity, "identity", resource, rules)
