"""Message maps compiled: which segment becomes which resource, and how they link.

A message map (messages/ADT_A01.csv) lists, per segment id, the segment table to apply and
the resource it makes (a new one, or the current one of its type), where in the message it
applies (after another segment) and the references it adds (`subject=Patient`,
`DiagnosticReport.result+=this`). The compiled map walks the message once, in order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.fhir import model as fhir_model
from gateway.mapping.compiler.context import Context
from gateway.mapping.compiler.identities import IdentityFn
from gateway.mapping.compiler.segments import FieldMaps, SegmentFn
from gateway.mapping.compiler.setters import Setter, compile_setter
from gateway.mapping.errors import TranslationError
from gateway.mapping.runtime import Json, Run, Scope
from gateway.mapping.tables import MessageMap, MessageRow

MessageFn = Callable[[Run], None]

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
        by_segment: dict[str, list[_MessageStep]] = {}
        for row in table.rows:
            step = self._message_step(row)
            if step is not None:
                by_segment.setdefault(row.segment, []).append(step)
        return _message_fn(by_segment)

    def _message_step(self, row: MessageRow) -> _MessageStep | None:
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
        return _MessageStep(row.resource, row.instance == "current", row.after, fn, read,
                            links, condition, self.identities.get((row.resource, row.segment)))

    def _links(self, row: MessageRow) -> list[_Link]:
        links: list[_Link] = []
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
                links.append(_Link(owner, setter, None, constant))
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
    identity: IdentityFn | None = None


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
    if step.identity is not None:
        draft.identity = step.identity(fields, run)
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
