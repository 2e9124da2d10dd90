"""Rows that each test one value first (against constants, or whether it is valued),
one after another, written as one `if`/`elif` chain on that value (an OBX-5 row per
value type: `OBX-2 == 'NM' and ...`, then `'SN' and ...`, then `'ED' and ...`).

Rows are grouped by what their first test holds for; where no value passes two groups'
tests (disjoint constants; valued and not), at most one group can hold, so its test runs
once and the others' not at all. Within a group each row still runs in its order, under
the rest of its condition: the rows that run are the same, in the same order, and each
test reads the message only (a condition never reads what a row writes), so what they
write is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gateway.mapping.codegen.source import spec_of

# A chain pays off from this many rows (each row beyond a group's first spares a test).
_ROWS = 3


def keyed(row: object) -> tuple[object, Any, object, tuple[object, ...]] | None:
    """A conditional row's first test of a value: the reader, what the test holds for
    (the constants it is one of; or whether it is valued), the test, and the rest of
    its condition (None: no such test)."""
    spec = spec_of(row)
    if spec[0] not in ("row", "applies_when") or spec[1] is None:
        return None
    condition = spec_of(spec[1])
    first, rest = ((condition[1][0], tuple(condition[1][1:])) if condition[0] == "and"
                   else (spec[1], ()))
    test = spec_of(first)
    holds: Any = True
    if test[0] == "not":
        test, holds = spec_of(test[1]), False
    if test[0] == "valued":
        return test[1], ("valued", holds), first, rest
    if test[0] == "equals" and holds:
        return test[1], frozenset((test[2],)), first, rest
    if test[0] == "in" and holds:
        return test[1], frozenset(test[2]), first, rest
    return None


def _disjoint(one: Any, other: Any) -> bool:
    """Whether no value passes both tests (what `keyed` says each holds for)."""
    if isinstance(one, frozenset) and isinstance(other, frozenset):
        return not one & other
    return isinstance(one, tuple) and isinstance(other, tuple) and one != other


def chain_length(rows: Sequence[object], start: int,
                 plain: Callable[[object], bool]) -> int:
    """How many rows from `start` can be one chain (0: too few to pay): rows `plain` (not
    otherwise written) testing the same reader first, whose groups' constants are
    disjoint."""
    first = keyed(rows[start]) if plain(rows[start]) else None
    if first is None:
        return 0
    groups: set[Any] = set()
    end = start
    while end < len(rows) and plain(rows[end]):
        key = keyed(rows[end])
        if key is None or spec_of(key[0]) != spec_of(first[0]):
            break
        if key[1] not in groups and not all(_disjoint(key[1], g) for g in groups):
            break
        groups.add(key[1])
        end += 1
    return end - start if end - start >= _ROWS and len(groups) > 1 else 0


def chain(rows: Sequence[object], test: Callable[[object], str],
          rest: Callable[[tuple[object, ...]], str],
          lines_of: Callable[[object], list[str]]) -> list[str]:
    """`rows` (a chain: `chain_length`) as `if`/`elif` on their groups' tests (`test`: a
    condition as an expression; a group's is its first row's first test), each row under
    the rest of its condition (`rest`), its statements `lines_of` (an `if` on its whole
    condition, then its body)."""
    order: list[Any] = []
    members: dict[Any, list[object]] = {}
    for row in rows:
        key = keyed(row)
        assert key is not None
        if key[1] not in members:
            order.append(key[1])
            members[key[1]] = []
        members[key[1]].append(row)
    lines: list[str] = []
    for number, values in enumerate(order):
        body: list[str] = []
        shared = ""  # the test of the row before, when the next may share it
        for row in members[values]:
            row_lines = lines_of(row)
            if not row_lines:
                continue
            assert row_lines[0].startswith("if ") and row_lines[0].endswith(":")
            others = keyed(row)[3]  # type: ignore[index]
            if not others:
                body += [line[4:] for line in row_lines[1:]]
                shared = ""
                continue
            # Rows one after another under the same rest share its test (as `_rows`
            # shares them: a row never makes a test that held not hold).
            head = f"if {rest(others)}:"
            body += row_lines[1:] if head == shared else [head, *row_lines[1:]]
            shared = head
        keyword = "if" if number == 0 else "elif"
        lines += [f"{keyword} {test(keyed(members[values][0])[2])}:",  # type: ignore[index]
                  *(["    " + line for line in body] or ["    pass"])]
    return lines
