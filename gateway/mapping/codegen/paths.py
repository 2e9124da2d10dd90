"""The statements that write a value at a FHIR path in the generated module: a setter
written out, the walk to its node, constant rows' values as one literal, and a group's
body guarded by its part.

Pure functions of what they are given (no state of the module being written), so the
emitter (`emit.py`) inlines them wherever a row writes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from gateway.mapping.codegen.source import (
    NotGenerated,
    Place,
    Tags,
    indent_lines,
    literal,
    single,
    spec_of,
)


def setter_statements(setter: object, out: str, tags: Tags, plain: bool = False
                      ) -> list[str]:
    """Statements writing `v` into `out` as the setter does (`plain`: `v` is known
    to be text or a number, never a dict)."""
    spec = spec_of(setter)
    if spec[0] == "set_value":
        return [f"{out}.setdefault('$value', v)"]
    if spec[0] == "single":
        return single(out, repr(spec[1]), plain)
    if spec[0] != "walk":
        raise NotGenerated(f"unknown setter {spec[0]}")
    _, walk, last_key, last_prefix, last_repeats, last_indexed = spec
    repeating = [i for i, step in enumerate(walk) if step[2]]
    if repeating and len({walk[i][3] for i in repeating}) == 1:
        # The deepest repeating instance, once made, is found in `inst` without
        # walking to it: its parents were made with it, under the same keys (a path
        # prefix names one place), and nothing removes them. Not when its key and a
        # parent's take different tags (`contact.telecom[1]`): the walk would make
        # another parent instance of this source before finding the shared one.
        deepest = repeating[-1]
        key, prefix, _, indexed = walk[deepest]
        made, parent = walk_to(walk[:deepest], out, tags)
        rest, node = walk_to(walk[deepest + 1:], "c", tags)
        lines = [f"c = inst.get({tags.key(prefix, indexed)})", "if c is None:",
                 *indent_lines(made, 1), "    c = {}",
                 f"    {parent}.setdefault({key!r}, []).append(c)",
                 f"    inst[{tags.key(prefix, indexed)}] = c", *rest]
    else:
        lines, node = walk_to(walk, out, tags)
    if node == "c" and not (last_repeats or plain):
        lines.append("nd = c")  # the single setter below uses `c` for its own
        node = "nd"
    if last_repeats and plain:
        lines.append(f"{node}.setdefault({last_key!r}, []).append(v)")
    elif last_repeats:
        lines += ["if isinstance(v, dict):",
                  f"    k = {tags.key(last_prefix, last_indexed)}",
                  "    e = inst.get(k)", "    if e is not None:", "        fill(e, v)",
                  "    else:", "        inst[k] = v",
                  f"        {node}.setdefault({last_key!r}, []).append(v)", "else:",
                  f"    {node}.setdefault({last_key!r}, []).append(v)"]
    else:
        lines += single(node, repr(last_key), plain)
    return lines


def walk_to(walk: Sequence[tuple[str, str, bool, bool]], out: str, tags: Tags
            ) -> tuple[list[str], str]:
    """Statements reaching the node at the end of `walk` below `out`, each missing
    step made (a repeating one: its instance for these tags), and the variable that
    then holds it (`out` itself for no step)."""
    lines: list[str] = []
    node = out
    for key, prefix, repeats, indexed in walk:
        if repeats:
            lines += [f"k = {tags.key(prefix, indexed)}", "c = inst.get(k)",
                      "if c is None:", "    c = {}",
                      f"    {node}.setdefault({key!r}, []).append(c)", "    inst[k] = c",
                      "nd = c"]
        elif node != "nd":
            lines += [f"nd = {node}.get({key!r})", "if nd is None:",
                      f"    {node}[{key!r}] = nd = {{}}"]
        else:
            lines += [f"if {key!r} in nd:", f"    nd = nd[{key!r}]", "else:",
                      f"    nd[{key!r}] = nd = {{}}"]
        node = "nd"
    return lines, node


def writes_constant(row: object, place: Place) -> bool:
    """A row that always writes one text, at a place known when it is generated."""
    spec = spec_of(row)
    return (spec[0] == "row" and spec[1] is None and place.tags.static is not None
            and not place.applied and spec_of(spec[2])[0] == "constant"
            and isinstance(spec_of(spec[2])[1], str)
            and spec_of(spec[3])[0] in ("walk", "single", "set_value"))


def guarded(body: list[str], index: int, parts: str) -> list[str]:
    """`body` run when part `index` is there and not empty; the part read once, in
    the test, into the variable `body` would read it into first (and, when `body`
    goes on only if it is not the explicit null, that too tested there)."""
    head = body[0].split(" = ", 1)
    if len(head) != 2 or head[1] != f"{parts}[{index}]":
        return [f"if {index} < count and {parts}[{index}]:", *indent_lines(body, 1)]
    name, rest = head[0], body[1:]
    test = f"{index} < count and ({name} := {parts}[{index}])"
    if rest and rest[0] == f"if {name} != NULL:" and all(
            not line or line.startswith("    ") for line in rest[1:]):
        test += f" and {name} != NULL"
        rest = [line[4:] for line in rest[1:]]
    return [f"if {test}:", *indent_lines(rest or ["pass"], 1)]


def shaped(value: Any, names: dict[int, str]) -> str:
    """A literal of what constant rows wrote; a repeating instance kept in `inst` is bound
    to its name (`names`) where it is made."""
    if isinstance(value, dict):
        inner = "{" + ", ".join(f"{k!r}: {shaped(v, names)}" for k, v in value.items()) + "}"
        name = names.get(id(value))
        return f"({name} := {inner})" if name else inner
    if isinstance(value, list):
        return "[" + ", ".join(shaped(v, names) for v in value) + "]"
    return literal(value)


# An instance key made in a repetition's loop (`Tags.key`): a path prefix joined to the
# repetition's tags.
_KEY = re.compile(r"'[^'\\]*' \+ (?:st|rt)\b")


def hoisted_keys(body: list[str], after: str) -> list[str]:
    """A repetition's loop body with each instance key it makes more than once made once,
    after the line `after` (where its tags are known), into a variable `ik<n>`: every
    `'participant' + st` otherwise joined a new text and hashed it again for `inst`."""
    if sum(line.lstrip().startswith("rt = ") for line in body) != 1:
        return body  # a loop inside the loop would change the tags under the variables
    counts = Counter(m.group(0) for line in body for m in _KEY.finditer(line))
    names = {expr: f"ik{n}" for n, expr in enumerate(
        expr for expr, count in counts.items() if count > 1)}
    if not names:
        return body
    out = [_KEY.sub(lambda m: names.get(m.group(0), m.group(0)), line) for line in body]
    at = body.index(after) + 1
    return out[:at] + [f"{name} = {expr}" for expr, name in names.items()] + out[at:]
