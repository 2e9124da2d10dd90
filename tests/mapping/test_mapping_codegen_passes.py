"""The passes that tidy a generated table function's statements (codegen/exits.py,
memos.py, loops.py) leave out only tests and reads whose answer is known: a function run
with and without them does the same."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.mapping.codegen.exits import known_parts, late_nones, with_exits
from gateway.mapping.codegen.loops import loop_body, single_repetition
from gateway.mapping.codegen.memos import known_memos
from gateway.mapping.codegen.source import indent_lines, is_valued, null_inline, text_of
from gateway.mapping.runtime import NULL


def _group(index: int, key: str) -> tuple[int, list[str]]:
    """A group writing part `index` under `key`, guarded as `paths.guarded` writes it."""
    return index, [f"if {index} < count and (raw := parts[{index}]) and raw != NULL:",
                   f"    out.setdefault({key!r}, []).append(raw)"]


def _run(body: list[str], parts: list[str]) -> Any:
    source = "def f(parts):\n" + "\n".join(indent_lines(
        ["out = {}", "count = len(parts)", *body, "return out"], 1)) + "\n"
    space: dict[str, Any] = {"NULL": NULL}
    exec(source, space)  # noqa: S102 - the statements under test
    return space["f"](parts)


GROUPS = [_group(0, "a"), _group(3, "b"), _group(1, "c"), _group(5, "d"), _group(4, "e"),
          (-1, ["out['k'] = 1"]), _group(7, "f"), _group(6, "g")]


@pytest.mark.parametrize("count", range(1, 10))
def test_a_function_with_exits_writes_what_it_wrote_without(count: int) -> None:
    parts = [f"p{n}" for n in range(count)]
    plain = [line for _, chunk in GROUPS for line in chunk] + ["return out"]
    tidied = known_parts(with_exits(GROUPS, "return out") + ["return out"], 1)
    assert _run(tidied, parts) == _run(plain, parts)


def test_an_exit_is_written_only_where_no_group_left_reads_a_part_before_it() -> None:
    lines = with_exits(GROUPS, "return out")
    # Before the group of no part (-1) every group left may run: no exit there.
    assert [line for line in lines if line.startswith("if count")] == ["if count <= 6:"]


def test_parts_known_there_are_read_without_testing_count() -> None:
    body = ["if count <= 4:", "    return out",
            "if 2 < count and (raw := parts[2]):", "    x = (parts[6] if 6 < count else '')",
            "if 7 < count and (raw := parts[7]):", "    y = (parts[6] if 6 < count else '')"]
    assert known_parts(body, 1) == [
        "if count <= 4:", "    return out",
        "if (raw := parts[2]):", "    x = (parts[6] if 6 < count else '')",
        "if 7 < count and (raw := parts[7]):", "    y = (parts[6])"]


def test_groups_of_one_field_share_its_split_but_loop_in_turn() -> None:
    def repetitions(key: str, narrowed: bool = False) -> tuple[int, list[str]]:
        return 5, ["if 5 < count and (fl := parts[5]) and fl != NULL:",
                   "    reps = fl.split(rs) if rs in fl else (fl,)",
                   *(["    reps = reps[0:1]"] if narrowed else []),
                   "    for raw in reps:", f"        out.setdefault({key!r}, []).append(raw)"]
    lines = with_exits([repetitions("a"), repetitions("b")], "return out")
    assert sum("fl.split" in line for line in lines) == 1
    assert _run(["rs = '~'", *lines], ["", "", "", "", "", "x~y"]) == {
        "a": ["x", "y"], "b": ["x", "y"]}  # all of a's, then all of b's
    narrowed = with_exits([repetitions("a", narrowed=True), repetitions("b")], "return out")
    assert sum("fl.split" in line for line in narrowed) == 2


MEMO = "(m_a if m_a is not None else (m_a := read()))"


def test_a_memo_is_read_as_its_variable_after_the_statement_that_first_reads_it() -> None:
    body = [f"if {MEMO} == 'NM':", "    x = 1", f"if {MEMO} == 'SN':", "    y = 2"]
    assert known_memos(body)[2] == "if m_a == 'SN':"


def test_a_memo_first_read_in_an_elif_or_a_nested_block_is_read_again_after_it() -> None:
    body = ["if z:", "    pass", f"elif {MEMO} == 'NM':", f"    x = {MEMO}",
            f"if {MEMO} == 'SN':", "    y = 2"]
    tidied = known_memos(body)
    assert tidied[3] == "    x = m_a"
    assert tidied[4] == body[4]  # the elif may not have run


def test_a_repetition_mapped_whole_is_the_loops_variable() -> None:
    tags = "rt = REPETITION_TAGS[i] if i < 100 else f'#{i + 1}'"
    body, var, numbered = loop_body(["raw = rep", "if not raw:", "    continue", tags,
                                     "st = '@PID-3' + rt", "out['x'] = raw"])
    assert (body, var, numbered) == (["if not raw:", "    continue", "out['x'] = raw"],
                                     "raw", False)
    body, var, numbered = loop_body(["raw = rep", tags, "st = '@PID-3' + rt",
                                     "scope.rep = rep", "inst['a' + rt] = raw"])
    assert var == "rep" and numbered and body[0] == "raw = rep"


def test_a_local_is_set_to_none_just_before_the_first_statement_reading_it() -> None:
    body = ["ob0 = None", "ob1 = None", "count = len(parts)",
            "if (raw := parts[0]):", "    ob0 = {'code': raw}", "if count <= 1:", "    return",
            "if (raw := parts[1]):", "    pass", "else:", "    x = ob1"]
    assert late_nones(body) == [
        "count = len(parts)", "ob0 = None", "if (raw := parts[0]):", "    ob0 = {'code': raw}",
        "if count <= 1:", "    return", "ob1 = None", "if (raw := parts[1]):", "    pass",
        "else:", "    x = ob1"]



def test_a_memo_the_first_statement_reading_it_evaluates_first_is_set_there() -> None:
    # No None before it, and no test of it there: nothing can have set it before.
    memo_a = "(m_a if m_a is not None else (m_a := parts[1]))"
    memo_b = "(m_b if m_b is not None else (m_b := parts[2]))"
    body = ["m_a = None", "m_b = None", f"if (not {memo_a}) and {memo_b} == 'x':",
            "    y = m_a", f"q0 = {memo_b}"]
    assert late_nones(body) == [
        "m_b = None", "if (not ((m_a := parts[1]))) and " + memo_b + " == 'x':",
        "    y = m_a", f"q0 = {memo_b}"]
    # Read first in a statement's body, it may not be read there: None before it.
    body = ["m_a = None", "if parts[0]:", f"    q0 = {memo_a}", f"q1 = {memo_a}"]
    assert late_nones(body) == body
    # What it writes runs: the same values.
    written = late_nones(["m_a = None", "m_b = None", f"r = {memo_a} + {memo_b} + m_a"])
    assert written[1].startswith("r = ((m_a := parts[1]))")
    for parts in (["", "a", "x"], ["", "", "x"], ["b", "", "y"]):
        space: dict[str, Any] = {"parts": parts}
        exec("\n".join(written), space)  # noqa: S102 - the pass's own output
        assert space["r"] == parts[1] + parts[2] + parts[1]


def test_the_explicit_null_is_written_as_its_literal_outside_texts_and_comments() -> None:
    source = ("def f(raw):\n"
              "    t = 'NULL != NULL\\'s' + \"NULL\"  # a comment's NULL\n"
              "    return raw != NULL and t or NULL_OTHER\n")
    written = null_inline(source)
    assert written.count("NULL") == source.count("NULL") - 1
    assert "return raw != '\"\"' and t or NULL_OTHER" in written
    space: dict[str, Any] = {"NULL_OTHER": "other"}
    exec(written, space)  # noqa: S102 - the pass's own output
    assert space["f"](NULL) == "other" and space["f"]("a") == "NULL != NULL's" + "NULL"

class _Run:
    def text(self, raw: str) -> str:
        return raw.replace("\\H\\", "").replace("\\T\\", "&")


@pytest.mark.parametrize("raw", ["", NULL, "a", "\\H\\", "\\T\\", " "])
def test_a_valued_test_on_the_raw_text_answers_as_on_its_value(raw: str) -> None:
    space = {"NULL": NULL, "esc": "\\", "run": _Run(), "raw": raw}
    value = text_of("raw")
    assert eval(is_valued(value), space) == eval(f"({value} != '')", space)  # noqa: S307


def _field(statements: list[str], fl: str) -> Any:
    source = "def f(fl):\n" + "\n".join(indent_lines(
        ["out = []", "rs = '~'", "if fl and fl != NULL:", *indent_lines(statements, 1),
         "return out"], 1)) + "\n"
    space: dict[str, Any] = {"NULL": NULL}
    exec(source, space)  # noqa: S102 - the statements under test
    return space["f"](fl)


@pytest.mark.parametrize("fl", ["a", "a~b", "~b", "a~", '""', 'a~""~c', "~"])
def test_one_repetition_is_mapped_as_the_loop_maps_it(fl: str) -> None:
    body = ["if not raw or raw == NULL:", "    continue", "out.append(raw)"]
    loop = ["for raw in (fl.split(rs) if rs in fl else (fl,)):", *indent_lines(body, 1)]
    single = single_repetition(body)
    assert single[0] == "if rs not in fl:"
    assert _field(single, fl) == _field(loop, fl)


def test_a_loop_left_otherwise_than_for_an_empty_repetition_is_kept() -> None:
    assert single_repetition(["if not raw or raw == NULL:", "    continue",
                              "if raw == 'x':", "    break"]) == []
    assert single_repetition(["raw = raw.split('^')[0]", "if not raw:", "    continue"]) == []
