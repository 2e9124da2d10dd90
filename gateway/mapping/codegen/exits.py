"""A table function's groups joined with early exits on the number of its parts.

A group that reads part N runs only when `N < count` (`paths.guarded`); most values have
far fewer parts than their data type has components (a CWE of three, of thirteen), so a
function tested `N < count` once per group whose part is not there. Where every group
left reads a part at or past the smallest index k among them, `if count <= k:` returns
at once: one test instead of one per group left. Below such an exit the parts before k
are known to be there, and their groups' `N < count` is left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# An exit costs one test when it is not taken: it is written only where it spares at
# least this many groups' tests when it is.
_SPARED = 2


def with_exits(chunks: Sequence[tuple[int, list[str]]], leave: str) -> list[str]:
    """The statements of `chunks` (a group's statements with the index of the part that
    guards them, -1 for none) one after another, with `leave` (the function's last
    statement) run early where no group left can run for want of parts."""
    chunks = _shared(chunks)
    lowest: list[int] = []  # the smallest index among the chunks from each on
    low = 1 << 30
    for index, _ in reversed(chunks):
        low = min(low, index) if index >= 0 else -1
        lowest.append(low)
    lowest.reverse()
    lines: list[str] = []
    known = 1  # no exit at 0: a function is given one part at least
    for position, (_, chunk) in enumerate(chunks):
        low = lowest[position]
        if low >= known and len(chunks) - position >= _SPARED:
            lines += [f"if count <= {low}:", f"    {leave}"]
            known = low + 1
        lines += chunk
    return lines


_EXIT = re.compile(r"if count <= (\d+):$")
_GUARD = re.compile(r"if (\d+) < count and (.*)$")
_TESTED = re.compile(r"if \(?(?:raw|fl) := parts\[(\d+)\]")
_READ = re.compile(r"parts\[(\d+)\] if \1 < count else ''")


def known_parts(body: list[str], known: int) -> list[str]:
    """A table function's statements without the tests `N < count` of parts known to be
    there: below an exit, and within a group guarded by part N for parts up to N (`known`:
    the parts known there from the start)."""
    lines: list[str] = []
    here = known  # in the group being read
    for number, line in enumerate(body):
        if not line.startswith(" "):
            if (exit_ := _EXIT.match(line)) and body[number + 1].strip().startswith("return"):
                known = int(exit_.group(1)) + 1
            guard = _GUARD.match(line)
            if guard and int(guard.group(1)) < known:
                line = "if " + guard.group(2)
            tested = _GUARD.match(line) or _TESTED.match(line)
            here = max(known, int(tested.group(1)) + 1) if tested else known
        lines.append(_read_known(line, here))
    return lines


def _read_known(line: str, known: int) -> str:
    """`line` reading parts below `known` without testing that they are there."""
    return _READ.sub(lambda m: f"parts[{m.group(1)}]" if int(m.group(1)) < known
                     else m.group(0), line)


_SPLIT = "    reps = fl.split(rs) if rs in fl else (fl,)"


def _shared(chunks: Sequence[tuple[int, list[str]]]) -> list[tuple[int, list[str]]]:
    """Chunks with groups of one field's repetitions one after another (a PID-5's names,
    then its nicknames) joined under one test of the field and one split: each still
    loops over the repetitions in its turn, so what they write comes in the same order.
    Not after a group that maps only some of the repetitions (it narrows `reps`)."""
    joined: list[tuple[int, list[str]]] = []
    for index, chunk in chunks:
        if joined and index >= 0 and joined[-1][0] == index and _repeats(chunk) and (
                _repeats(joined[-1][1]) and chunk[0] == joined[-1][1][0]
                and not any(line.lstrip().startswith("reps = reps[")
                            for line in joined[-1][1])):
            joined[-1] = (index, joined[-1][1] + chunk[2:])
        else:
            joined.append((index, chunk))
    return joined


def _repeats(chunk: list[str]) -> bool:
    """A group of a field's repetitions: its test of the field, then the split."""
    return len(chunk) > 1 and "(fl := parts[" in chunk[0] and chunk[1] == _SPLIT


_NONE = re.compile(r"(m_\w+|ob\d+) = None$")
# What a statement evaluates before a memo it reads first (as `memos._FIRST`).
_FIRST = re.compile(r"(?:if |\w+ = )(?:\(|not )*$")
_CLAUSES = ("elif ", "else:", "except", "finally:")


def late_nones(body: list[str]) -> list[str]:
    """A function's memos and local instances set to None just before the first statement
    that reads them, not at its start: an exit before it (or an absent part) then skips
    them too (a CWE's second and third codings, when it has three parts)."""
    statements: list[list[str]] = []
    for line in body:
        if line.startswith(" ") or line.startswith(_CLAUSES):
            statements[-1].append(line)
        else:
            statements.append([line])
    waiting = [s[0].split(" = ")[0] for s in statements if len(s) == 1 and _NONE.match(s[0])]
    lines: list[str] = []
    for statement in statements:
        if len(statement) == 1 and _NONE.match(statement[0]):
            continue
        text = "\n".join(statement)
        for name in [n for n in waiting if re.search(rf"\b{n}\b", text)]:
            waiting.remove(name)
            first = _set_first(statement[0], name)
            if first is None:
                lines.append(f"{name} = None")
            else:
                statement[0] = first
        lines += statement
    return lines


def _set_first(line: str, name: str) -> str | None:
    """`line` setting the memo `name` without testing it, when the memo is the first
    thing the statement evaluates (nothing can have set it before: the statement is the
    first to read it); None otherwise (it is then set to None before the statement)."""
    memo = f"({name} if {name} is not None else ({name} := "
    at = line.find(memo)
    if at < 0 or not _FIRST.match(line[:at]):
        return None
    return line[:at] + f"(({name} := " + line[at + len(memo):]
