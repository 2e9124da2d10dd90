"""The group committer behind the inbox and audit writers (both backends): concurrent
submissions share commits, in order; a batch that fails fails only its own callers, with
the store's answer; a large item closes a batch; with `settle`, callers a few event-loop
turns behind join the batch; nothing is taken once closed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from gateway.store.errors import StoreUnavailable
from gateway.store.group_commit import GroupCommitter

log = logging.getLogger(__name__)


class Disk:
    """A commit function that records its batches and refuses those holding 'bad'."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def commit(self, items: Sequence[str]) -> list[int]:
        await asyncio.sleep(0)  # the next batch gathers meanwhile
        if "bad" in items:
            raise OSError("disk full")
        self.batches.append(list(items))
        return [len(item) for item in items]


def committer(disk: Disk, **options: object) -> GroupCommitter[str, int]:
    made: GroupCommitter[str, int] = GroupCommitter(
        disk.commit, name="test", logger=log, max_batch=int(str(options.get("max_batch", 64))),
        failure=lambda exc: StoreUnavailable(f"not stored ({type(exc).__name__})"),
        closed="closing", size=len, max_bytes=int(str(options.get("max_bytes", 1 << 20))),
        settle=int(str(options.get("settle", 0))))
    made.start()
    return made


async def test_concurrent_items_share_commits_in_submission_order() -> None:
    disk = Disk()
    writer = committer(disk, max_batch=8)
    items = [f"item-{n}" for n in range(40)]
    results = await asyncio.gather(*(writer.submit(item) for item in items))
    await writer.close()
    assert results == [len(item) for item in items]
    assert [item for batch in disk.batches for item in batch] == items
    assert writer.batches == len(disk.batches) < 40 and max(map(len, disk.batches)) <= 8
    assert writer.committed == 40


async def test_a_failed_batch_fails_only_its_callers_with_the_stores_answer() -> None:
    disk = Disk()
    writer = committer(disk, max_batch=2)
    futures = [writer.submit(item) for item in ("a", "bad", "c", "d")]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    await writer.close()
    assert isinstance(outcomes[0], StoreUnavailable) and isinstance(outcomes[1], StoreUnavailable)
    assert str(outcomes[0]) == "not stored (OSError)"
    assert outcomes[2:] == [1, 1] and disk.batches == [["c", "d"]]


async def test_a_large_item_closes_its_batch() -> None:
    disk = Disk()
    writer = committer(disk, max_bytes=10)
    await asyncio.gather(*(writer.submit(item) for item in ("12345", "123456", "1", "2")))
    await writer.close()
    assert disk.batches == [["12345"], ["123456", "1", "2"]]


async def submit_two_turns_apart(writer: GroupCommitter[str, int]) -> list[int]:
    """'a' now and 'b' two loop turns later, as a second request still being parsed."""
    first = writer.submit("a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return list(await asyncio.gather(first, writer.submit("b")))


@pytest.mark.parametrize(("settle", "batches"), [(0, [["a"], ["b"]]), (5, [["a", "b"]])])
async def test_settle_turns_let_callers_under_way_join_the_batch(
        settle: int, batches: list[list[str]]) -> None:
    disk = Disk()
    writer = committer(disk, settle=settle)
    assert await submit_two_turns_apart(writer) == [1, 1]
    await writer.close()
    assert disk.batches == batches


async def test_nothing_is_taken_once_closed_and_what_was_queued_is_committed() -> None:
    disk = Disk()
    writer = committer(disk)
    queued = writer.submit("last")
    await writer.close()
    assert await queued == 4
    with pytest.raises(StoreUnavailable, match="closing"):
        await writer.submit("late")
