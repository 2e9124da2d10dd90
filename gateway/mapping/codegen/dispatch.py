"""Rows that each test one value first (against constants, or whether it is valued),
one after another, written as one `if`/`elif` chain on that value (an OBX-5 row per
value type: `OBX-2 == 'NM' and ...`, then `'SN' and ...`, then `'ED' and ...`).

Rows are grouped by what their first test holds for; where no value passes two groups'
tests (disjoint constants; valued and not), at most one group can hold, so its test runs
once and the others' not at all. Within a group each row still runs in its order, under
the rest of its condition: the rows that run are the same, in the same order, and each
test reads the message only (a condition never reads what a row writes), so what they
write is the same. Within a group, rows whose rest tests another value first the same
way are chained on it in turn (a PL's rows by PL-3, then by PL-2, then by PL-8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gateway.mapping.codegen.source import spec_of

# A chain pays off from this many rows (each row beyond a group's first spares a test);
# within a group, from two.
_ROWS = 3

# A row, and the tests of its condition left to run (all of them joined by `and`).
Item = tuple[object, tuple[object, ...]]
Test = Callable[[object], str]  # a condition as an expression
Lines = Callable[[object], list[str]]  # a row's statements: `if` its condition, its body


def _tests(row: object) -> tuple[object, ...] | None:
    """The tests a conditional row's condition joins (None: not a conditional row)."""
    spec = spec_of(row)
    if spec[0] not in ("row", "applies_when") or spec[1] is None:
        return None
    condition = spec_of(spec[1])
    return tuple(condition[1]) if condition[0] == "and" else (spec[1],)


def _first(tests: tuple[object, ...]) -> tuple[Any, Any] | None:
    """What the first test reads (its reader's description), and what it holds for: the
    constants the value is one of, or whether it is valued (None: another test)."""
    if not tests:
        return None
    test = spec_of(tests[0])
    holds = True
    if test[0] == "not":
        test, holds = spec_of(test[1]), False
    if test[0] == "valued":
        return spec_of(test[1]), ("valued", holds)
    if test[0] == "equals" and holds:
        return spec_of(test[1]), frozenset((test[2],))
    if test[0] == "in" and holds:
        return spec_of(test[1]), frozenset(test[2])
    return None


def _disjoint(one: Any, other: Any) -> bool:
    """Whether no value passes both tests (what `_first` says each holds for)."""
    if isinstance(one, frozenset) and isinstance(other, frozenset):
        return not one & other
    return isinstance(one, tuple) and isinstance(other, tuple) and one != other


def _run(items: Sequence[Item], start: int, least: int) -> int:
    """How many items from `start` can be one chain (0: fewer than `least`, or one
    group): their first tests read one value, and no value passes two groups' tests."""
    first = _first(items[start][1])
    if first is None:
        return 0
    groups: set[Any] = set()
    end = start
    while end < len(items):
        key = _first(items[end][1])
        if key is None or key[0] != first[0]:
            break
        if key[1] not in groups and not all(_disjoint(key[1], g) for g in groups):
            break
        groups.add(key[1])
        end += 1
    return end - start if end - start >= least and len(groups) > 1 else 0


def chain_length(rows: Sequence[object], start: int, plain: Callable[[object], bool]) -> int:
    """How many rows from `start` can be one chain (0: too few to pay), among those
    `plain` (not otherwise written)."""
    items: list[Item] = []
    for row in rows[start:]:
        tests = _tests(row) if plain(row) else None
        if tests is None:
            break
        items.append((row, tests))
    return _run(items, 0, _ROWS) if items else 0


def chain(rows: Sequence[object], test: Test, lines_of: Lines) -> list[str]:
    """`rows` (a chain: `chain_length`) as `if`/`elif` on their groups' first tests."""
    return _chain([(row, _tests(row) or ()) for row in rows], test, lines_of)


def _chain(items: Sequence[Item], test: Test, lines_of: Lines) -> list[str]:
    order: list[Any] = []
    members: dict[Any, list[Item]] = {}
    for row, tests in items:
        key = _first(tests)
        assert key is not None
        if key[1] not in members:
            order.append(key[1])
            members[key[1]] = []
        members[key[1]].append((row, tests))
    lines: list[str] = []
    for number, holds in enumerate(order):
        group = members[holds]
        body = _body([(row, tests[1:]) for row, tests in group], test, lines_of)
        # Valued, then not (or the other way round): the second needs no test.
        head = ("else:" if number and all(isinstance(h, tuple) for h in order) else
                f"{'elif' if number else 'if'} {test(group[0][1][0])}:")
        lines += [head,
                  *(["    " + line for line in body] or ["    pass"])]
    return lines


def _body(items: Sequence[Item], test: Test, lines_of: Lines) -> list[str]:
    """A group's rows in order, each under the tests left of its condition."""
    body: list[str] = []
    shared = ""  # the test of the row before, when the next may share it
    at = 0
    while at < len(items):
        length = _run(items, at, 2)
        if length:
            body += _chain(items[at:at + length], test, lines_of)
            shared = ""
            at += length
            continue
        row, tests = items[at]
        at += 1
        row_lines = lines_of(row)
        if not row_lines:
            continue
        assert row_lines[0].startswith("if ") and row_lines[0].endswith(":")
        if not tests:
            body += [line[4:] for line in row_lines[1:]]
            shared = ""
            continue
        # Rows one after another under the same tests share them (as `Emitter._rows`
        # shares them: a row never makes a test that held not hold).
        head = "if (" + " and ".join(test(t) for t in tests) + "):"
        body += row_lines[1:] if head == shared else [head, *row_lines[1:]]
        shared = head
    return body
