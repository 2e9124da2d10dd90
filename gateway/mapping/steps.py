"""What a compiled message map runs: its steps (segment -> resource, with links and an
identity rule) and the one walk over a message's segments that applies them.

The compiler (`compiler/messages.py`) builds the steps from the tables; the generated
source (`mapping.codegen`) builds the same steps over its own functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.mapping.errors import TranslationError
from gateway.mapping.runtime import Json, Run, Scope, described

MessageFn = Callable[[Run], None]
# (the object written into, instances made so far, repetition tag, source tag, value)
Setter = Callable[[Json, dict[str, Json], str, str, Any], None]
# (the segment's fields, the run, the resource content being written)
SegmentFn = Callable[[list[str], Run, Json], None]
# (the segment's fields, the run) -> the identity text, or "" when no rule gives one.
IdentityFn = Callable[[list[str], Run], str]


@dataclass(frozen=True, slots=True)
class Link:
    owner: str | None  # None: the new resource; a type: the current resource of that type
    setter: Setter
    refers_to: str | None  # "this", a resource type, or None for a constant
    constant: Any


@dataclass(frozen=True, slots=True)
class MessageStep:
    resource: str
    into_current: bool
    after: str
    apply: SegmentFn
    read: frozenset[int]
    links: list[Link]
    condition: Callable[[Scope], bool] | None
    identity: IdentityFn | None = None


def message_fn(by_segment: dict[str, list[MessageStep]]) -> MessageFn:
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
            read: frozenset[int] | None = None
            try:
                for step in steps:
                    if step.after and step.after != anchor:
                        continue
                    if step.condition is not None and not step.condition(
                            Scope(fields, "", run)):
                        continue
                    apply_step(step, fields, run)
                    read = step.read if read is None else read | step.read
            except TranslationError as exc:
                exc.sequence = segment.occurrence
                raise
            if read is None:  # rows exist, but none for this place in the message
                if segment_id.startswith("Z"):
                    run.z_segments += 1
                else:
                    run.unmapped[segment_id] += 1
                continue
            if read:
                # MSH-1 and MSH-2 are the delimiters, never unmapped.
                first = 3 if segment_id == "MSH" else 1
                for number in [n for n in range(first, len(fields))
                               if fields[n] and n not in read]:
                    run.unmapped[f"{segment_id}-{number}"] += 1
    return described(translate, "message", by_segment)


def apply_step(step: MessageStep, fields: list[str], run: Run) -> None:
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
    draft = run.new_draft(step.resource, content)
    if step.identity is not None:
        draft.identity = step.identity(fields, run)
    if not step.links:
        run.current[step.resource] = draft
        return
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
