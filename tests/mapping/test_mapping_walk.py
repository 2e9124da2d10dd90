"""The message walk counts as unmapped every valued field that no step applied to its
segment reads: the field numbers it looks at are worked out once per segment id, field
count and steps applied, and kept, so a kept answer must be the one for exactly that
combination (another width, or another step's condition, gives another answer)."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.hl7.message import parse_message
from gateway.mapping.runtime import Json, Run, Scope, read_own
from gateway.mapping.steps import MessageStep, message_fn
from support.builders import hl7
from support.mapping import translator

MSH = "MSH|^~\\&|SYNTHAPP|SYNTHHOSP|ISTHMUS|GATEWAY|20260101120000||ADT^A01|WALK-1|P|2.5.1"
FIFTH = read_own(5, 0, 0)


def _write_first(parts: list[str], run: Run, out: Json) -> None:
    out["text"] = parts[1]


def _fifth_valued(scope: Scope) -> bool:
    return FIFTH(scope) != ""


def _walk() -> MessageStep:
    """AL1 rows: one always applied reading AL1-1 and AL1-2, one reading AL1-4 applied
    only when AL1-5 is valued, and one applied always that reads nothing."""
    return message_fn({"AL1": [
        MessageStep("Basic", False, "", _write_first, frozenset({1, 2}), [], None),
        MessageStep("Basic", False, "", _write_first, frozenset({4}), [], _fifth_valued),
        MessageStep("Basic", False, "", _write_first, frozenset(), [], None),
    ]})


def _unmapped(walk: object, *segments: str) -> Counter[str]:
    run = Run(parse_message(hl7(MSH, *segments)))
    walk(run)  # type: ignore[operator]
    return run.unmapped


# (AL1 segments, what the walk counts): one width with and without the conditional row,
# and other widths with the same rows; each case after the others, so kept answers from
# earlier cases are in the walk when it runs.
CASES = [
    (["AL1|a|b|c|d"], {"AL1-3": 1, "AL1-4": 1}),
    (["AL1|a|b|c|d|"], {"AL1-3": 1, "AL1-4": 1}),
    (["AL1|a|b|c|d|e"], {"AL1-3": 1, "AL1-5": 1}),
    (["AL1|a|b||d|e"], {"AL1-5": 1}),
    (["AL1|a|b|c|d||g"], {"AL1-3": 1, "AL1-4": 1, "AL1-6": 1}),
    (["AL1|a|b|c|d|e|g"], {"AL1-3": 1, "AL1-5": 1, "AL1-6": 1}),
    (["AL1|a|b|c|d|e", "AL1|a|b|c|d", "AL1|a||c"], {"AL1-3": 3, "AL1-4": 1, "AL1-5": 1}),
    # Wider than the walk keeps answers for: worked out each time, alike.
    (["AL1|a|b" + "|x" * 300], {f"AL1-{n}": 1 for n in range(3, 303) if n != 4}),
    (["AL1|a|b" + "|" * 299 + "|y"], {"AL1-302": 1}),
]


@pytest.mark.parametrize("order", [1, -1], ids=["forward", "backward"])
def test_unmapped_fields_are_those_no_applied_row_reads_in_any_order(order: int) -> None:
    walk = _walk()
    for _ in range(2):  # the second time every answer is a kept one
        for segments, expected in CASES[::order]:
            assert _unmapped(walk, *segments) == expected, segments


def test_rows_that_read_no_field_count_nothing_unmapped() -> None:
    walk = message_fn({"AL1": [
        MessageStep("Basic", False, "", _write_first, frozenset(), [], None)]})
    for _ in range(2):
        assert _unmapped(walk, "AL1|a|b|c|d|e") == {}


def test_shipped_tables_count_an_unread_field_only_where_it_is_valued() -> None:
    # The shipped AL1 rows read AL1-1 to AL1-5; AL1-6 (identification date) is not mapped.
    def unmapped(al1: str) -> dict[str, int]:
        data = hl7(MSH, "PID|1||MRN-1^^^SYNTHHOSP^MR||DOE^JANE", al1)
        found = translator().translate(parse_message(data)).unmapped
        return {k: v for k, v in found.items() if k.startswith("AL1")}

    for _ in range(2):
        assert unmapped("AL1|1|DA|PCN^Penicillin^L|SV|Hives|20260101") == {"AL1-6": 1}
        assert unmapped("AL1|1|DA|PCN^Penicillin^L|SV|Hives|") == {}
        assert unmapped("AL1|1|DA|PCN^Penicillin^L|SV|Hives") == {}
        assert unmapped("AL1|1|DA|PCN^Penicillin^L|SV|Hives||X") == {"AL1-7": 1}
