"""Python source pieces the emitter writes with: what a compiled closure says it does,
values as literals, the keys of repeating instances, where a group's rows read, the
statements of a single-valued write and of a table function's prelude."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any


class NotGenerated(Exception):
    """A compiled construct this generator cannot write as source (the caller falls back
    to the compiler's closures)."""


def spec_of(fn: object) -> tuple[Any, ...]:
    spec = getattr(fn, "spec", None)
    if not isinstance(spec, tuple) or not spec:
        raise NotGenerated(f"no description on {fn!r}")
    return spec


def literal(value: object) -> str:
    """`value` as Python source that evaluates to an equal value."""
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, Decimal):
        return f"Decimal({str(value)!r})"
    if isinstance(value, tuple):
        inner = ", ".join(literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, frozenset):
        return "frozenset({" + ", ".join(literal(v) for v in sorted(value)) + "})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    raise NotGenerated(f"no literal for a {type(value).__name__}")


class Tags:
    """The instance keys of a group: known when it is written (one repetition), or held
    in the variables `rt`, `st` (a repeating field)."""

    def __init__(self, static: tuple[str, str] | None) -> None:
        self.static = static

    def key(self, prefix: str, indexed: bool) -> str:
        if self.static is not None:
            return repr(prefix + self.static[0 if indexed else 1])
        return f"{prefix!r} + {'rt' if indexed else 'st'}"


class Place:
    """Where a group's rows read and write: variable names and expressions."""

    def __init__(self, raw: str, seps: str, location: str, tags: Tags,
                 applied: bool = False, rep_field: int = 0, valued: bool = False) -> None:
        self.rep_field = rep_field  # the field whose repetition is in `rep`, or 0
        self.valued = valued  # `raw` is known to be neither empty nor the explicit null
        self.raw = raw
        self.seps = seps
        self.location = location
        self.tags = tags
        self.applied = applied  # count whether a row applied (into `applied`)


def single(node: str, key: str, plain: bool = False) -> list[str]:
    if plain:
        return [f"if {key} not in {node}:", f"    {node}[{key}] = v"]
    return [f"c = {node}.get({key})", "if c is None:", f"    {node}[{key}] = v",
            "elif isinstance(c, dict) and isinstance(v, dict):", "    fill(c, v)"]


def first_leaf(raw: str, seps: str) -> str:
    """An expression: `runtime.leaf(raw, seps)`, called only when a separator below is in
    the text (most values have none: a comparison or two, not a call). A level has at most
    two separators below it; more, and the call decides. Separators known when it is
    written (`separators`) are tested by name."""
    if seps == "''":
        return raw
    if seps == "comp_seps":
        return f"(leaf({raw}, comp_seps) if comp_sep in {raw} or sub_sep in {raw} else {raw})"
    if seps == "sub_sep":
        return f"(leaf({raw}, sub_sep) if sub_sep in {raw} else {raw})"
    return (f"(leaf({raw}, {seps}) if {seps} and ({seps}[0] in {raw} or {seps}[-1] in {raw}"
            f" or len({seps}) > 2) else {raw})")


def split_below(raw: str, seps: str) -> tuple[str, str] | None:
    """Expressions: the parts of `raw` one level down and the separators below them, for
    separators known when it is written (`separators`); None for others."""
    return {"comp_seps": (f"{raw}.split(comp_sep)", "sub_sep"),
            "sub_sep": (f"{raw}.split(sub_sep)", "''"), "''": (f"[{raw}]", "''")}.get(seps)


def separators(c: int, s: int) -> str:
    """`runtime.separators_below` as the names the prelude binds (an HL7 message always
    has both separators, one character each: `Delimiters`)."""
    return "''" if s else ("sub_sep" if c else "comp_seps")


def text_of(raw: str) -> str:
    """An expression: the raw text's value as a reader gives it (the explicit null is
    no value; escapes undone; in a table function, which binds `esc`)."""
    return f"('' if (x := {raw}) == NULL else (run.text(x) if esc in x else x))"


def memo(name: str, read: str) -> str:
    """An expression: `read`, evaluated once per call into the variable `name`."""
    return f"({name} if {name} is not None else ({name} := {read}))"


def prelude(body: list[str], lazy: dict[str, str]) -> list[str]:
    """What a table function's body uses of the run: a Scope for the readers (made when
    first needed), the escape character for inline unescaping, the separators of
    repetitions and below a field and a component."""
    text = "\n".join(body)
    for name, read in list(lazy.items()):
        if read and text.count(memo(name, read)) == 1:
            # Read by one row only: read in place, no variable to set up in every call.
            body = [line.replace(memo(name, read), read) for line in body]
            del lazy[name]
    text = "\n".join(body)
    if not re.search(r"\binst\b", text.replace("inst = {}", "", 1)):
        body = [line for line in body if line != "inst = {}"]  # no repeating element
    head = [f"{name} = None" for name in sorted(lazy)]
    if re.search(r"\bcomp_seps\b", text):
        head.append("comp_seps = run.d.component + run.d.subcomponent")
    if re.search(r"\bcomp_sep\b", text):
        head.append("comp_sep = run.d.component")
    if re.search(r"\bsub_sep\b", text):
        head.append("sub_sep = run.d.subcomponent")
    if re.search(r"\brs\b", text):
        head.append("rs = run.d.repetition")  # a field's repetitions are split by it
    if re.search(r"\bscope\b", text):
        head.append("scope = None")  # made by the first reader that needs one (`Emitter._read`)
    if re.search(r"\besc\b", text):
        head.append("esc = run.d.escape")
    return head + body


def indent_lines(lines: list[str], depth: int) -> list[str]:
    pad = "    " * depth
    return [pad + line if line else line for line in lines]


def indent(lines: list[str], depth: int) -> str:
    return "\n".join(indent_lines(lines, depth)) + "\n"
