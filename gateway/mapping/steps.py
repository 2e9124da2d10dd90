"""What a compiled message map runs: its steps (segment -> resource, with links and an
identity rule) and the one walk over a message's segments that applies them.

The compiler (`compiler/messages.py`) builds the steps from the tables; the generated
source (`mapping.codegen`) writes each segment id's steps out as a function of its own,
which `message_walk` runs as `message_fn` runs the steps.
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
# (the segment's fields, the run, the id of the segments before it, the escape character
# or "" when the segment holds none: `Segment.escape`): one segment id's steps written
# out (`message_walk`).
SegmentWalk = Callable[[list[str], Run, str, str], None]


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
    # Per segment id: its steps, and the fields they leave unread (`_Place`).
    places = {segment_id: _Place(segment_id, steps)
              for segment_id, steps in by_segment.items()}

    def translate(run: Run) -> None:
        last_id = ""
        anchor = ""
        latest = run.latest
        unmapped = run.unmapped
        for segment in run.message.segments():
            segment_id = segment.id
            # Another segment's field is read from its nearest occurrence so far (the OBR
            # above an OBX), so each occurrence is remembered as it goes by.
            latest[segment_id] = segment
            if segment_id != last_id:
                anchor, last_id = last_id, segment_id
            place = places.get(segment_id)
            if place is None:
                if segment_id.startswith("Z"):
                    run.z_segments += 1
                elif segment_id != "MSH":
                    unmapped[segment_id] += 1
                continue
            fields = segment.fields
            applied = 0  # the bits of the steps applied
            # One Scope for the segment's conditions: what it remembers (the segment's own
            # fields) does not change while the segment is mapped.
            scope: Scope | None = None
            try:
                for step, bit, after, condition in place.plan:
                    if after and after != anchor:
                        continue
                    if condition is not None:
                        if scope is None:
                            scope = Scope(fields, "", run)
                        if not condition(scope):
                            continue
                    apply_step(step, fields, run)
                    applied |= bit
            except TranslationError as exc:
                exc.sequence = segment.occurrence
                raise
            if not applied:  # rows exist, but none for this place in the message
                if segment_id.startswith("Z"):
                    run.z_segments += 1
                else:
                    unmapped[segment_id] += 1
                continue
            count = len(fields)
            unread = place.kept.get(applied * KEY + count) if count <= KEPT_FIELDS else None
            if unread is None:
                unread = place.unread(applied, count)
            for number, label in unread:
                if fields[number]:
                    unmapped[label] += 1
    return described(translate, "message", by_segment)


def message_walk(walks: dict[str, SegmentWalk]) -> MessageFn:
    """The walk of the generated source (`codegen/walk.py`): `message_fn`'s, with each
    segment id's steps, conditions, links and unread fields written out as one function."""
    def translate(run: Run) -> None:
        last_id = ""
        anchor = ""
        latest = run.latest
        for segment in run.message.segments():
            segment_id = segment.id
            latest[segment_id] = segment  # as in `message_fn`
            if segment_id != last_id:
                anchor, last_id = last_id, segment_id
            walk = walks.get(segment_id)
            if walk is None:
                if segment_id.startswith("Z"):
                    run.z_segments += 1
                elif segment_id != "MSH":
                    run.unmapped[segment_id] += 1
                continue
            try:
                walk(segment.fields, run, anchor, segment.escape)
            except TranslationError as exc:
                exc.sequence = segment.occurrence
                raise
    return translate


# Field counts up to this are remembered per place (the standard's segments have well under
# 100); a longer segment (a sender's padding) is worked out each time.
KEPT_FIELDS = 256
KEY = KEPT_FIELDS + 1  # (applied bits, field count) -> one int key


class Unread:
    """Which fields of one segment id its steps leave unread: the same for every segment of
    that id, that field count and those steps applied, so the field numbers to look at for
    an unmapped count are worked out once per combination, not per segment."""

    __slots__ = ("segment_id", "reads", "kept")

    def __init__(self, segment_id: str, reads: list[frozenset[int]]) -> None:
        self.segment_id = segment_id
        self.reads = [(read, 1 << n) for n, read in enumerate(reads)]  # step n: bit n
        # applied * KEY + field count -> `unread`'s answer (the walks look here first).
        self.kept: dict[int, tuple[tuple[int, str], ...]] = {}

    def unread(self, applied: int, field_count: int) -> tuple[tuple[int, str], ...]:
        """(field number, unmapped label) of every field no applied step reads, for
        segments of `field_count` fields (the id included); nothing when the applied steps
        read no field at all (a step that only makes a resource)."""
        if field_count > KEPT_FIELDS:
            return self._work_out(applied, field_count)
        key = applied * KEY + field_count
        found = self.kept.get(key)
        if found is None:
            found = self.kept[key] = self._work_out(applied, field_count)
        return found

    def _work_out(self, applied: int, field_count: int) -> tuple[tuple[int, str], ...]:
        read: frozenset[int] = frozenset().union(
            *(read for read, bit in self.reads if applied & bit))
        if not read:
            return ()
        # MSH-1 and MSH-2 are the delimiters, never unmapped.
        first = 3 if self.segment_id == "MSH" else 1
        return tuple((n, f"{self.segment_id}-{n}")
                     for n in range(first, field_count) if n not in read)


class _Place(Unread):
    """The steps of one segment id, as the walk reads them, and their unread fields."""

    __slots__ = ("plan",)

    def __init__(self, segment_id: str, steps: list[MessageStep]) -> None:
        super().__init__(segment_id, [step.read for step in steps])
        # What the walk reads of each step, unpacked once: the step, its bit, its `after`
        # and its condition.
        self.plan = [(step, 1 << n, step.after, step.condition)
                     for n, step in enumerate(steps)]


def apply_step(step: MessageStep, fields: list[str], run: Run) -> None:
    current = run.current
    resource = step.resource
    draft = current.get(resource) if step.into_current else None
    if draft is not None:
        step.apply(fields, run, draft.content)
        return
    content: Json = {}
    step.apply(fields, run, content)
    if not content:
        # An empty segment makes no resource, and ends the previous one's turn: the RXE
        # after an empty ORC must not write into the order before it.
        current.pop(resource, None)
        return
    draft = run.new_draft(resource, content, True,
                          "" if step.identity is None else step.identity(fields, run))
    links = step.links
    if not links:
        current[resource] = draft
        return
    # One instance map per owner: the links of a row that write one owner's repeating
    # element (Patient.link.other and Patient.link.type) fill one instance of it. The
    # new resource's (most links write into it) is made once, another owner's when needed.
    own: dict[str, Json] = {}
    insts: dict[int, dict[str, Json]] | None = None
    for link in links:
        owner_type = link.owner
        if owner_type is None:
            owner = draft
            inst = own
        else:  # the current resource of that type (this one is not current yet)
            other = current.get(owner_type)
            if other is None:
                continue
            owner = other
            if insts is None:
                insts = {}
            inst = insts.setdefault(id(owner), {})
        refers_to = link.refers_to
        if refers_to is None:
            link.setter(owner.content, inst, "", "", link.constant)
            continue
        target = draft if refers_to == "this" else current.get(refers_to)
        if target is None or target is owner:
            continue
        link.setter(owner.content, inst, "", "", run.reference(target))
    current[resource] = draft
