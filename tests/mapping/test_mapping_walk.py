"""The message walk counts as unmapped every valued field that no step applied to its
segment reads: the field numbers it looks at are worked out once per segment id, field
count and steps applied, and kept, so a kept answer must be the one for exactly that
combination (another width, or another step's condition, gives another answer). The walk
the generator writes out per segment id applies the same steps, links and counts."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.hl7.message import parse_message
from gateway.mapping.engine import Translator
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


@pytest.fixture(scope="module", params=[True, False], ids=["generated", "interpreted"])
def either(request: pytest.FixtureRequest) -> Translator:
    """The shipped tables as the gateway runs them (their walk written out per segment id,
    `codegen/walk.py`) and as the interpreter does (`message_fn`)."""
    return Translator.load(generate=request.param)


def test_a_step_applies_after_its_anchor_segment_and_nowhere_else(either: Translator) -> None:
    # ORM^O01 NTE rows: into the order after an OBR (a second NTE too: its anchor is the
    # segment before the run of NTEs); after the PID no row applies, so the NTE is counted.
    msh = MSH.replace("ADT^A01", "ORM^O01")
    data = hl7(msh, "PID|1||MRN-1^^^SYNTHHOSP^MR||DOE^JANE", "NTE|1||before any order",
               "ORC|NW|ORD-1", "OBR|1|ORD-1||CBC^Blood count^L", "NTE|1||fasting",
               "NTE|2||second")
    translation = either.translate(parse_message(data))
    notes = [r.content.get("note") for r in translation.resources
             if r.resource_type == "ServiceRequest"]
    assert notes == [[{"text": "fasting"}, {"text": "second"}]]
    assert translation.unmapped == {"NTE": 1}


def test_conditions_links_and_unread_fields_of_a_segment_walk(either: Translator) -> None:
    # PID-42 is past every field the PID rows read; PV1's one row applies only to a
    # visit that is not `N` (or has PV1-19), so this PV1 is counted whole; IN1's row for
    # a plan that is not self-paid makes a Coverage linked to the Patient.
    data = hl7(MSH, "PID|1||MRN-1^^^SYNTHHOSP^MR||DOE^JANE" + "|" * 36 + "|X", "PV1|1|N",
               "IN1|1|PLAN-1")
    translation = either.translate(parse_message(data))
    by_type = {r.resource_type: r for r in translation.resources}
    assert "Encounter" not in by_type
    assert translation.unmapped == {"PID-42": 1, "PV1": 1}
    patient_url = f"urn:uuid:{by_type['Patient'].id}"
    assert by_type["Coverage"].content["beneficiary"] == {"reference": patient_url}


def test_a_segment_wider_than_the_kept_answers_counts_its_unread_fields_alike(
        either: Translator) -> None:
    # 306 fields: past the widths whose answers the walk keeps (worked out each time),
    # and twice, so a kept answer for another width is never taken for it.
    al1 = "AL1|1|DA|PCN^Penicillin^L|SV|Hives" + "|" * 300 + "|z"
    for _ in range(2):
        data = hl7(MSH, "PID|1||MRN-1^^^SYNTHHOSP^MR||DOE^JANE", al1, "AL1|2|DA|X^Y^L||Z")
        found = either.translate(parse_message(data)).unmapped
        assert {k: v for k, v in found.items() if k.startswith("AL1")} == {"AL1-306": 1}
