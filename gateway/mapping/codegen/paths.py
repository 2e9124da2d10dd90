"""The statements that write a value at a FHIR path in the generated module: a setter
written out, the walk to its node, constant rows' values as one literal, and a group's
body guarded by its part.

Functions of what they are given (no state of the module being written), so the
emitter (`emit.py`) inlines them wherever a row writes; in a table function they are
given, and tell, what is known there of its instances and keys (`instances.Instances`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from gateway.mapping.codegen.instances import Instances, Use
from gateway.mapping.codegen.source import (
    NotGenerated,
    Place,
    Tags,
    indent_lines,
    literal,
    single,
    spec_of,
)


def setter_statements(setter: object, out: str, tags: Tags, plain: bool = False,
                      insts: Instances | None = None) -> list[str]:
    """Statements writing `v` into `out` as the setter does (`plain`: `v` is known
    to be text or a number, never a dict; `insts`: in a table function, what is known
    there of its instances, else they are all in `inst`)."""
    spec = spec_of(setter)
    if spec[0] == "set_value":
        if insts is not None and not insts.may_hold(out, "$value"):
            insts.wrote(out, "$value")
            return [f"{out}['$value'] = v"]
        return [f"{out}.setdefault('$value', v)"]
    if spec[0] == "single":
        return _single(out, spec[1], plain, insts)
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
        use = insts.use(tags, prefix, indexed) if insts is not None else None
        if use is None:
            made, parent = walk_to(walk[:deepest], out, tags, insts)
            rest, node = walk_to(walk[deepest + 1:], "c", tags, insts)
            lines = [f"c = inst.get({tags.key(prefix, indexed)})", "if c is None:",
                     *indent_lines(made, 1), "    c = {}",
                     f"    {_appended(parent, key, 'c', insts)}",
                     f"    inst[{tags.key(prefix, indexed)}] = c", *rest]
        else:
            assert insts is not None  # (where `use` came from)
            if not walk[deepest + 1:] and not last_repeats:
                # The value is the new instance's first key: made holding it.
                return _into_instance(use, walk[:deepest], out, key, last_key, plain,
                                      tags, insts)
            made, parent = walk_to(walk[:deepest], out, tags, insts)
            making = [*made, f"{use.var} = {{}}",
                      _appended(parent, key, use.var, insts)]
            lines = making if use.fresh else [f"if {use.var} is None:",
                                              *indent_lines(making, 1)]
            rest, node = walk_to(walk[deepest + 1:], use.var, tags, insts)
            lines += rest
    else:
        lines, node = walk_to(walk, out, tags, insts)
    if node == "c" and not (last_repeats or plain):
        lines.append("nd = c")  # the single setter below uses `c` for its own
        node = "nd"
    if last_repeats and plain:
        lines.append(_appended(node, last_key, "v", insts))
    elif last_repeats:
        lines += _repeating_value(node, last_key, last_prefix, last_indexed, tags, insts)
    else:
        lines += _single(node, last_key, plain, insts)
    return lines


def appended_alone(setter: object, out: str) -> list[str] | None:
    """Statements appending `v` to the repeating element the setter names directly below
    `out` when its instances are no one else's (a link's: made empty for it), or None
    for another setter: no instance is there to fill, and none is looked for later."""
    spec = spec_of(setter)
    if spec[0] != "walk" or spec[1] or not spec[4]:
        return None
    return [f"{out}.setdefault({spec[2]!r}, []).append(v)"]


def _single(node: str, key: str, plain: bool, insts: Instances | None) -> list[str]:
    """A single value written where none is (the first row to write it wins)."""
    if insts is None:
        return single(node, repr(key), plain)
    known_absent = not insts.may_hold(node, key)
    insts.wrote(node, key)
    return [f"{node}[{key!r}] = v"] if known_absent else single(node, repr(key), plain)


def _appended(node: str, key: str, value: str, insts: Instances | None) -> str:
    """A statement appending `value` to the list `key` of `node` (made if missing)."""
    appended = f"{node}.setdefault({key!r}, []).append({value})"
    if insts is None:
        return appended
    known_absent = not insts.may_hold(node, key)
    insts.wrote(node, key)
    return f"{node}[{key!r}] = [{value}]" if known_absent else appended


def _into_instance(use: Use, walk: Sequence[tuple[str, str, bool, bool]], out: str,
                   key: str, last_key: str, plain: bool, tags: Tags, insts: Instances
                   ) -> list[str]:
    """`v` written as `last_key` of a local repeating instance (`use`) made below the
    end of `walk`, with the value in it when this statement makes it."""
    var = use.var
    made, parent = walk_to(walk, out, tags, insts)
    new = f"{{{last_key!r}: v}}"
    if use.fresh:
        insts.wrote(var, last_key)
        if not use.keep:
            return [*made, _appended(parent, key, new, insts)]
        return [*made, f"{var} = {new}", _appended(parent, key, var, insts)]
    making = [*made, f"{var} = {new}", _appended(parent, key, var, insts)]
    there = _single(var, last_key, plain, insts)
    if there[0].startswith("if ") and len(there) == 2:
        return [f"if {var} is None:", *indent_lines(making, 1), "el" + there[0], there[1]]
    return [f"if {var} is None:", *indent_lines(making, 1), "else:",
            *indent_lines(there, 1)]


def _repeating_value(node: str, key: str, prefix: str, indexed: bool, tags: Tags,
                     insts: Instances | None) -> list[str]:
    """`v` appended to the repeating element `key` of `node`; a dict (a data type's
    value) is the element's instance for these tags, filled when there is one."""
    append = f"{node}.setdefault({key!r}, []).append(v)"
    use = insts.use(tags, prefix, indexed) if insts is not None else None
    if use is None:
        if insts is not None:
            insts.wrote(node, key)
        return ["if isinstance(v, dict):", f"    k = {tags.key(prefix, indexed)}",
                "    e = inst.get(k)", "    if e is not None:", "        fill(e, v)",
                "    else:", "        inst[k] = v", f"        {append}", "else:",
                f"    {append}"]
    assert insts is not None
    insts.filled(use.var)
    append = _appended(node, key, "v", insts)
    if use.fresh:
        kept = ["if isinstance(v, dict):", f"    {use.var} = v"] if use.keep else []
        return [*kept, append]
    return ["if isinstance(v, dict):", f"    if {use.var} is not None:",
            f"        fill({use.var}, v)", "    else:", f"        {use.var} = v",
            f"        {append}", "else:", f"    {append}"]


def walk_to(walk: Sequence[tuple[str, str, bool, bool]], out: str, tags: Tags,
            insts: Instances | None = None) -> tuple[list[str], str]:
    """Statements reaching the node at the end of `walk` below `out`, each missing
    step made (a repeating one: its instance for these tags), and the variable that
    then holds it (`out` itself for no step)."""
    lines: list[str] = []
    node = out
    for key, prefix, repeats, indexed in walk:
        use = insts.use(tags, prefix, indexed) if repeats and insts is not None else None
        if use is not None:
            assert insts is not None
            making = [f"{use.var} = {{}}", _appended(node, key, use.var, insts)]
            lines += making if use.fresh else [f"if {use.var} is None:",
                                               *indent_lines(making, 1)]
            node = use.var
            continue
        if repeats:
            lines += [f"k = {tags.key(prefix, indexed)}", "c = inst.get(k)",
                      "if c is None:", "    c = {}",
                      f"    {node}.setdefault({key!r}, []).append(c)", "    inst[k] = c",
                      "nd = c"]
        elif insts is not None and not insts.may_hold(node, key):
            lines += [f"{node}[{key!r}] = nd = {{}}"]
        elif node != "nd":
            lines += [f"nd = {node}.get({key!r})", "if nd is None:",
                      f"    {node}[{key!r}] = nd = {{}}"]
        else:
            lines += [f"if {key!r} in nd:", f"    nd = nd[{key!r}]", "else:",
                      f"    nd[{key!r}] = nd = {{}}"]
        if insts is not None:
            insts.wrote(node, key)
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


def literal_writes(made: dict[str, Any], inst: dict[str, Any], out: str, insts: Instances
                   ) -> list[str]:
    """What constant rows wrote into an empty object (`made`; their repeating instances
    in `inst`, by key) as statements writing it into `out` as literals, each instance
    kept under its key: in its local variable, or in `inst`."""
    names: dict[int, str] = {}
    kept: list[str] = []
    for n, (key, value) in enumerate(inst.items()):
        var = insts.known(key)
        if var is None:
            names[id(value)] = f"n{n}"
            kept.append(f"inst[{key!r}] = n{n}")
        else:
            names[id(value)] = var
            insts.holding(var, value)
    insts.holding(out, made)
    return [f"{out}[{key!r}] = {shaped(value, names)}" for key, value in made.items()] + kept


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
