"""The edge's memory budget: what the listener and the handler charge, and when the
listener is told to read again (`gateway.ingest.protocol.Budget`)."""

from __future__ import annotations

from gateway.ingest.protocol import Budget, frame_charge

KIB = 1024


def _budget(limit: int = 100 * KIB, headroom: int = 10 * KIB) -> tuple[Budget, list[int]]:
    budget = Budget(limit)
    budget.headroom = headroom
    told: list[int] = []
    budget.on_room = lambda: told.append(budget.held)
    return budget, told


def test_a_whole_frame_counts_twice_and_is_refused_past_the_limit() -> None:
    budget, _ = _budget()
    assert budget.take(frame_charge(40 * KIB))
    assert budget.held == 80 * KIB
    assert not budget.take(frame_charge(11 * KIB))
    assert budget.refused == 1
    budget.give_back(frame_charge(40 * KIB))
    assert budget.held == 0 and budget.peak == 80 * KIB


def test_unfinished_frames_are_charged_as_read_and_never_refused() -> None:
    budget, _ = _budget()
    budget.receive(95 * KIB)
    budget.receive(20 * KIB)  # already in memory: counted, even past the limit
    assert budget.held == budget.receiving == 115 * KIB
    assert budget.full and not budget.draining
    budget.receive(-200 * KIB)  # never below what unfinished frames hold
    assert budget.held == budget.receiving == 0


def test_full_means_the_next_read_could_cross_the_limit() -> None:
    budget, _ = _budget()
    budget.receive(90 * KIB)
    assert not budget.full
    budget.receive(1)
    assert budget.full


def test_the_listener_is_told_when_answered_frames_make_room() -> None:
    budget, told = _budget()
    assert budget.take(frame_charge(30 * KIB))
    budget.receive(35 * KIB)
    assert budget.full and budget.draining
    budget.give_back(frame_charge(30 * KIB))
    assert told == [35 * KIB]
    assert not budget.full


def test_the_listener_is_told_when_only_unfinished_frames_are_left_holding_it() -> None:
    # Waiting for more ACKs would free nothing: reading on lets the listener drop the
    # unfinished frame whose read crosses the line (else every connection waits for ever).
    budget, told = _budget()
    assert budget.take(frame_charge(5 * KIB))
    budget.receive(91 * KIB)  # reads while answered frames were still held
    assert budget.full and budget.draining
    budget.give_back(frame_charge(5 * KIB))
    assert budget.full and not budget.draining
    assert told == [91 * KIB]
