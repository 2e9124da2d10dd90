"""A message map's walk written out: per segment id, one function doing what
`steps.message_fn` does for a segment of that id (each step's `after` test and condition,
its segment function called directly, the draft, its identity and its links, the fields
left unread), so no step is interpreted; `steps.message_walk` runs them in message order.

What the walk writes is `steps.apply_step`'s, statement by statement; where a test always
holds or never does for the steps at hand (a step with no condition is always applied; a
link from the new resource to the resource it is, never), it is decided here. Functions
written alike (the same segment in several message types) are written once.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from gateway.mapping.codegen.paths import appended_alone, setter_statements
from gateway.mapping.codegen.source import (
    NotGenerated,
    Place,
    Tags,
    counted,
    indent,
    indent_lines,
    literal,
    spec_of,
)
from gateway.mapping.steps import KEPT_FIELDS, KEY, Link, MessageStep

_UNREAD = "UNREAD"  # the Unread object's name in a function's text, until it has one


class Writer(Protocol):
    """What the walk needs of the emitter: the functions a step calls, named."""

    top: list[str]
    functions: list[str]

    def segment(self, fn: object) -> str: ...

    def identity(self, fn: object) -> str: ...

    def condition(self, predicate: object, place: Place | None) -> str: ...

    def reading_fields(self, lines_of: Callable[[Place], list[str]]) -> list[str]: ...

    def new_name(self, prefix: str) -> str: ...


class Walks:
    """The walk functions of one module, each written once."""

    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        self._by_text: dict[str, str] = {}  # a function's text (unnamed) -> its name

    def message(self, fn: object) -> str:
        """`steps.message_walk` over the message map's segment functions, as an expression."""
        spec = spec_of(fn)
        if spec[0] != "message":
            raise NotGenerated(f"unknown message function {spec[0]}")
        by_segment: dict[str, list[MessageStep]] = spec[1]
        entries = ", ".join(f"{segment_id!r}: {self._segment_walk(segment_id, steps)}"
                            for segment_id, steps in by_segment.items())
        return f"message_walk({{{entries}}})"

    def _segment_walk(self, segment_id: str, steps: list[MessageStep]) -> str:
        writer = self._writer
        # Named before the body is written (each writes a function of its own).
        applies = [writer.segment(step.apply) for step in steps]
        identities = ["''" if step.identity is None else
                      f"{writer.identity(step.identity)}(parts, run, esc)" for step in steps]
        # The bits of the steps applied are known where every step always applies.
        always = not any(step.after or step.condition is not None for step in steps)

        def lines_of(place: Place) -> list[str]:
            lines = ["current = run.current"] if always else ["current = run.current",
                                                               "applied = 0"]
            for bit, (step, apply, identity) in enumerate(
                    zip(steps, applies, identities, strict=True)):
                body = _applied(step, apply, identity)
                tests = ([f"anchor == {step.after!r}"] if step.after else []) + (
                    [writer.condition(step.condition, place)] if step.condition else [])
                if tests:
                    lines += [f"if {' and '.join(tests)}:",
                              *indent_lines([*body, f"applied |= {1 << bit}"], 1)]
                else:
                    lines += [*body, *([] if always else [f"applied |= {1 << bit}"])]
            return lines + _unread(segment_id, steps, always)

        body = writer.reading_fields(lines_of)
        text = f"(parts, run, anchor, esc):  # {segment_id}\n" + indent(body, 1)
        name = self._by_text.get(text)
        if name is None:
            name = self._by_text[text] = writer.new_name("W")
            if _UNREAD in text:
                reads = literal([frozenset(step.read) for step in steps])
                writer.top.append(f"{name}_U = Unread({segment_id!r}, {reads})")
                writer.top.append(f"{name}_K = {name}_U.kept")
            writer.functions.append(f"def {name}" + text.replace(f"{_UNREAD}_K", f"{name}_K")
                                    .replace(_UNREAD, f"{name}_U"))
        return name


def _applied(step: MessageStep, apply: str, identity: str) -> list[str]:
    """`steps.apply_step` written out for `step`."""
    resource = repr(step.resource)
    new_draft = f"run.new_draft({resource}, content, True, {identity})"
    links = _links(step.links)
    made = ["content = {}", f"{apply}(parts, run, content, esc)", "if content:",
            *([f"    draft = {new_draft}", *indent_lines(links, 1),
               f"    current[{resource}] = draft"] if links else
              [f"    current[{resource}] = {new_draft}"]),
            # An empty segment makes no resource, and ends the previous one's turn.
            "else:", f"    current.pop({resource}, None)"]
    if not step.into_current:
        return made
    return [f"draft = current.get({resource})", "if draft is not None:",
            f"    {apply}(parts, run, draft.content, esc)", "else:",
            *indent_lines(made, 1)]


def _links(links: list[Link]) -> list[str]:
    """The links of a new resource (`draft`, its `content`), before it is current, each
    setter's statements written in place (`v` the value, `inst` the owner's instances).

    A type's current resource is one of that type, and the new one is not current yet: a
    link to the resource its owner is never runs, and every other owner or target is
    another resource than the new one (so `apply_step`'s test of it always holds)."""
    lines: list[str] = []
    owners: dict[str, str] = {}  # an owner type -> its variable (its instances': + "_i")
    used: set[str] = set()  # the instance maps a setter uses
    # An owner's links: one alone finds its (new, empty) instances empty.
    per_owner = Counter(link.owner for link in links)
    for link in links:
        if link.owner is None:
            owner, inst = "content", "own"
            if "own = {}" not in lines:
                lines.append("own = {}")  # the new resource's repeating instances
        else:
            owner = owners.get(link.owner, "")
            if not owner:
                owner = owners[link.owner] = f"o{len(owners) + 1}"
                lines += [f"{owner} = current.get({link.owner!r})", f"{owner}_i = {{}}"]
            owner, inst = f"{owner}.content", f"{owner}_i"
        if link.refers_to is None:
            value = literal(link.constant)
        elif link.refers_to == "this":
            if link.owner is None:
                continue  # the new resource to itself
            value = "run.reference(draft)"
        else:
            if link.refers_to == link.owner:
                continue  # a resource to itself
            value = "run.reference(t)"
        tests = [] if link.owner is None else [f"{owners[link.owner]} is not None"]
        if value == "run.reference(t)":
            tests.append(f"(t := current.get({link.refers_to!r})) is not None")
        # The setter's tags are "" here (`apply_step` gives none): written as constants.
        alone = appended_alone(link.setter, owner) if per_owner[link.owner] == 1 else None
        written = alone or setter_statements(link.setter, owner, Tags(("", "")))
        uses_inst = any(re.search(r"\binst\b", line) for line in written)
        if uses_inst:
            used.add(inst)
        call = [f"v = {value}", *([f"inst = {inst}"] if uses_inst else []), *written]
        lines += [f"if {' and '.join(tests)}:", *indent_lines(call, 1)] if tests else call
    # An instance map no setter uses is not made.
    unused = {f"{name} = {{}}" for name in ("own", *(f"{o}_i" for o in owners.values()))
              if name not in used}
    return [line for line in lines if line not in unused]


def _unread(segment_id: str, steps: list[MessageStep], always: bool) -> list[str]:
    """`message_fn`'s ending for a segment: not applied, or its valued fields no applied
    step reads counted as unmapped (found in the `Unread` object's `kept` first)."""
    lines: list[str] = []
    if not always and all(step.after or step.condition is not None for step in steps):
        count_it = (["run.z_segments += 1"] if segment_id.startswith("Z") else
                    counted(repr(segment_id)))
        lines += ["if not applied:", *indent_lines(count_it, 1), "    return"]
    if not any(step.read for step in steps):
        return lines  # nothing read: nothing left unread is counted
    key = f"{((1 << len(steps)) - 1) * KEY} + count" if always else f"applied * {KEY} + count"
    applied = str((1 << len(steps)) - 1) if always else "applied"
    # Found by indexing (no `get` call), but only for a count the keys are made for.
    return lines + [
        f"if count > {KEPT_FIELDS}:", f"    unread = {_UNREAD}.unread({applied}, count)",
        "else:", "    try:", f"        unread = {_UNREAD}_K[{key}]", "    except KeyError:",
        f"        unread = {_UNREAD}.unread({applied}, count)",
        "if unread:", "    unmapped = run.unmapped", "    for number, label in unread:",
        # (`get`: see `source.counted`)
        "        if parts[number]:", "            unmapped[label] = unmapped.get(label, 0) + 1"]
