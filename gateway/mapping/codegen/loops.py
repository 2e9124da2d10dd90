"""The body of the loop over a field's repetitions in the generated module, without what
its rows do not use."""

from __future__ import annotations

import re

TAGS = "rt = REPETITION_TAGS[i] if i < 100 else f'#{i + 1}'"


def loop_body(body: list[str]) -> tuple[list[str], str, bool]:
    """`body` (starting `raw = rep`, or reading below `rep`; `TAGS`, then the source tag
    `st = ...` after it) without the tags its rows do not use; the loop's variable; and
    whether the loop numbers the repetitions (`i`)."""
    # The repetition's tags are for setters of repeating elements; most rows have none.
    tag_lines = body[body.index(TAGS):][:2]
    rest = [line for line in body if line not in tag_lines]
    if not any(re.search(r"\bst\b", line) for line in rest):
        body.remove(tag_lines[1])
        if not any(re.search(r"\brt\b", line) for line in rest):
            body.remove(tag_lines[0])
    # Without the tags the repetition's number is not needed: no enumerate.
    numbered = any(re.search(r"\bi\b", line) for line in body)
    # A repetition mapped whole is the loop's own variable.
    if body[0] == "raw = rep" and not any(re.search(r"\brep\b", line) for line in body[1:]):
        return body[1:], "raw", numbered
    return body, "rep", numbered


_SKIP = ["if not raw or raw == NULL:", "    continue"]


def single_repetition(body: list[str]) -> list[str]:
    """The statements for a field (`fl`, there and not the explicit null) whose
    repetitions the loop `body` maps whole (`raw`): one repetition (most fields have one)
    mapped without a loop, or else the loop. [] where `body` has more than its test of
    an empty repetition to leave early from (it cannot leave a loop that is not there)."""
    if body[:2] != _SKIP or any(re.search(r"\b(?:continue|break)\b", line)
                                for line in body[2:]):
        return []
    return ["if rs not in fl:", "    raw = fl", *["    " + line for line in body[2:]],
            "else:", "    for raw in fl.split(rs):", *["        " + line for line in body]]
