"""Message maps compiled: which segment becomes which resource, and how they link.

A message map (messages/ADT_A01.csv) lists, per segment id, the segment table to apply and
the resource it makes (a new one, or the current one of its type), where in the message it
applies (after another segment) and the references it adds (`subject=Patient`,
`DiagnosticReport.result+=this`). The compiled map walks the message once, in order.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.fhir import model as fhir_model
from gateway.mapping.compiler.context import Context
from gateway.mapping.compiler.identities import IdentityFn
from gateway.mapping.compiler.segments import FieldMaps
from gateway.mapping.compiler.setters import compile_setter
from gateway.mapping.steps import Link, MessageFn, MessageStep, message_fn
from gateway.mapping.tables import MessageMap, MessageRow

_LINK = re.compile(r'(?:([A-Z][A-Za-z]+)\.)?([A-Za-z][A-Za-z0-9.]*)(\+?=)(.+)$')


class MessageMaps:
    """Compiles message maps over the segment tables of `segments`."""

    def __init__(self, ctx: Context, segments: FieldMaps,
                 identities: dict[tuple[str, str], IdentityFn] | None = None) -> None:
        self.ctx = ctx
        self.segments = segments
        self.identities = identities or {}

    def message(self, table: MessageMap) -> MessageFn:
        """A message map compiled: one function that walks the message's segments."""
        by_segment: dict[str, list[MessageStep]] = {}
        for row in table.rows:
            step = self._message_step(row)
            if step is not None:
                by_segment.setdefault(row.segment, []).append(step)
        return message_fn(by_segment)

    def _message_step(self, row: MessageRow) -> MessageStep | None:
        where = row.where
        before = len(self.ctx.errors)
        if not self.ctx.known_segment(row.segment):
            self.ctx.errors.append(where.error(f"unknown HL7 v2 segment '{row.segment}'"))
        if row.after and not self.ctx.known_segment(row.after):
            self.ctx.errors.append(where.error(f"after: unknown HL7 v2 segment '{row.after}'"))
        if row.instance not in ("new", "current"):
            self.ctx.errors.append(where.error("instance must be 'new' or 'current'"))
        if not fhir_model.is_resource_type(row.resource):
            self.ctx.errors.append(where.error(f"'{row.resource}' is not a FHIR resource type"))
            return None
        compiled = self.segments.segment(row.map, where)
        table = self.ctx.tables.segments.get(row.map)
        if compiled is None or table is None:
            return None
        if table.target_type != row.resource:
            self.ctx.errors.append(where.error(
                f"map {row.map} writes a {table.target_type}, not a {row.resource}"))
        if table.v2_type != row.segment:
            self.ctx.errors.append(where.error(f"map {row.map} reads {table.v2_type}, "
                                           f"not {row.segment}"))
        links = self._links(row)
        condition = None
        if row.condition:
            condition = self.ctx.condition(row.condition, table, where)
        if len(self.ctx.errors) > before:
            return None
        fn, read = compiled
        return MessageStep(row.resource, row.instance == "current", row.after, fn, read,
                            links, condition, self.identities.get((row.resource, row.segment)))

    def _links(self, row: MessageRow) -> list[Link]:
        links: list[Link] = []
        for text in filter(None, (t.strip() for t in row.links.split(";"))):
            match = _LINK.match(text)
            if match is None:
                self.ctx.errors.append(row.where.error(
                    f"link '{text}' must look like subject=Patient, "
                    f"DiagnosticReport.result+=this or link.type=\"replaces\""))
                continue
            owner, path, operator, value = match.groups()
            on_type = owner or row.resource
            try:
                element = fhir_model.element(on_type, path)
                setter = compile_setter(on_type, path)
            except (fhir_model.UnknownElement, ValueError) as exc:
                self.ctx.errors.append(row.where.error(f"link '{text}': {exc}"))
                continue
            if value.startswith('"') and value.endswith('"'):
                constant: Any = value[1:-1]
                if element.codes and constant not in element.codes:
                    self.ctx.errors.append(row.where.error(
                        f"link '{text}': not one of {', '.join(element.codes)}"))
                    continue
                links.append(Link(owner, setter, None, constant))
                continue
            refers_to = row.resource if value == "this" else value
            if element.type != "Reference":
                self.ctx.errors.append(row.where.error(f"link '{text}': {path} is "
                                                   f"{element.type}, not a Reference"))
                continue
            if element.reference_targets and refers_to not in element.reference_targets:
                self.ctx.errors.append(row.where.error(
                    f"link '{text}': {path} may not refer to {refers_to}"))
                continue
            links.append(Link(owner, setter, "this" if value == "this" else value, None))
        return links
