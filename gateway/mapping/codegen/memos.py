"""Values a table function reads once (`source.memo`: a variable, None until the first read
sets it) read as the bare variable where the generator can see the first read has run.

A statement whose first evaluation is the memo (`if (m_x if m_x is not None else ...) ==
'NM':`, `q0 = (m_x ...)`) has set it once it has run; so have the statements after it in
its block and in the blocks inside them, until the block ends. An OBX-5 row per value
type tests OBX-2 twenty times over: one test of the memo, then twenty of the variable.
An `elif` test runs only when the tests before it did not hold: what it sets is known in
its own body only.
"""

from __future__ import annotations

import re

from gateway.mapping.codegen.source import NotGenerated

_FIRST = re.compile(r"(?:if |elif |\w+ = )(?:\(|not )*$")
_MEMO = re.compile(r"\((\w+) if \1 is not None else \(\1 := ")


def known_memos(body: list[str]) -> list[str]:
    """`body` with each memo read as its variable where it is known to be set."""
    memos = _memos(body)
    if not memos:
        return body
    # (indent, names known in the lines indented at least this much), innermost last
    known: list[tuple[int, set[str]]] = []
    out: list[str] = []
    for line in body:
        stripped = line.lstrip(" ")
        depth = len(line) - len(stripped)
        while known and known[-1][0] > depth:
            known.pop()
        names = {name for _, held in known for name in held}
        for name in names:
            line = line.replace(memos[name], name)
        for name, expression in memos.items():
            at = line.find(expression)
            if at < 0 or not _FIRST.match(line[depth:at]):
                continue
            # Set by this statement: later reads in it, and after it, are the variable.
            cut = at + len(expression)
            line = line[:cut] + line[cut:].replace(expression, name)
            level = depth + 1 if stripped.startswith("elif ") else depth
            if known and known[-1][0] == level:
                known[-1][1].add(name)
            else:
                known.append((level, {name}))
        out.append(line)
    return out


def _memos(body: list[str]) -> dict[str, str]:
    """The memos `body` reads: each variable's expression (the same wherever it is read)."""
    found: dict[str, str] = {}
    for line in body:
        for match in _MEMO.finditer(line):
            if match.group(1) not in found:
                found[match.group(1)] = line[match.start():_closing(line, match.start())]
    return found


def _closing(line: str, start: int) -> int:
    """The index after the parenthesis that closes the one at `start` (texts skipped)."""
    depth = 0
    quote = ""
    escaped = False
    for at in range(start, len(line)):
        char = line[at]
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return at + 1
    raise NotGenerated(f"no closing parenthesis in {line!r}")
