"""The outbox rows on both backends: read in order with payloads, results written, a
dead row holding its patient's later rows; on PostgreSQL one instance at a time delivers
a backend, a standby takes over when the holder goes, and a deposed holder's late
results do not overwrite its successor's."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from gateway.store.pg.connect import PgSpec
from gateway.store.pg.inbox import PgInbox
from gateway.store.pg.outbox import PgOutbox
from support.backends import Backend, inbound
from support.wait import eventually


async def test_due_rows_come_in_id_order_with_payloads_and_results_stick(
        store_backend: Backend) -> None:
    inbox = await store_backend.inbox()
    try:
        for n in range(6):
            await inbox.accept(inbound(f"O-{n}", f"MSH|{n}".encode(), routes=("ehr",),
                                       patient_key=f"p{n % 2}"))
        outbox = store_backend.outbox(inbox)
        assert await outbox.lead("ehr")
        rows = await outbox.due("ehr", "mllp", 0, 10)
        assert [r.payload for r in rows] == [f"MSH|{n}".encode() for n in range(6)]
        await outbox.mark_delivered([(rows[0].id, "ACK AA")])
        await outbox.reschedule(rows[1].id, 1, 10.0, "HTTP 503", "busy")
        await outbox.dead(rows[2].id, 3, "ACK AE", "refused")
        # p0's later row (O-4) waits behind its dead row O-2; p1's go on.
        left = await outbox.due("ehr", "mllp", 0, 10)
        assert [r.id for r in left] == [rows[1].id, rows[3].id, rows[5].id]
        assert await outbox.count_pending("ehr") == 4
        assert await outbox.held_by(rows[2].id) == 1
        assert await outbox.retry([rows[2].id]) == 1
        assert len(await outbox.due("ehr", "mllp", 0, 10)) == 5
        entry = await outbox.get(rows[0].id)
        assert entry is not None and entry.status == "delivered"
        assert entry.control_id == "O-0"
    finally:
        if isinstance(outbox, PgOutbox):
            await outbox.close()
        await inbox.close()


async def test_one_instance_delivers_a_backend_and_a_standby_takes_over(
        store_backend: Backend) -> None:
    if store_backend.pool is None:
        pytest.skip("one gateway per SQLite data dir: it always delivers")
    inbox = await store_backend.inbox()
    first = store_backend.outbox(inbox, "first")
    second = store_backend.outbox(inbox, "second")
    assert isinstance(first, PgOutbox) and isinstance(second, PgOutbox)
    try:
        await inbox.accept(inbound("L-1", routes=("ehr",)))
        assert await first.lead("ehr")
        assert not await second.lead("ehr")
        assert await second.lead("lab")  # another backend: another lease
        [row] = await first.due("ehr", "mllp", 0, 10)
        await first.close()  # the holder goes (a crash drops its session the same way)
        assert await second.lead("ehr")
        [again] = await second.due("ehr", "mllp", 0, 10)
        assert again.id == row.id
        # The old holder's late result is fenced off: the row is the successor's now.
        await first.mark_delivered([(row.id, "ACK AA")])
        assert await second.count_pending("ehr") == 1
        await second.mark_delivered([(row.id, "ACK AA")])
        assert await second.count_pending("ehr") == 0
    finally:
        await first.close()
        await second.close()
        await inbox.close()


async def test_an_idle_holder_is_woken_by_another_instances_rows(store_backend: Backend) -> None:
    if store_backend.pool is None:
        pytest.skip("NOTIFY is PostgreSQL's")
    inbox = await store_backend.inbox()
    outbox = store_backend.outbox(inbox, "holder")
    assert isinstance(outbox, PgOutbox)
    woken = asyncio.Event()
    outbox.on_new_rows = woken.set
    try:
        assert await outbox.lead("ehr")
        other = await store_backend.inbox()  # another instance's inbox
        await other.accept(inbound("N-1", routes=("ehr",)))
        await other.close()
        await asyncio.wait_for(woken.wait(), 10)
    finally:
        await outbox.close()
        await inbox.close()


async def test_a_row_locked_elsewhere_holds_back_the_rows_after_it(
        store_backend: Backend) -> None:
    """A claim skips a row another transaction has locked (an instance killed while
    claiming it, whose statement is still ending), and reads nothing after it: its
    patient's later rows must not go first."""
    if store_backend.pool is None or store_backend.spec is None:
        pytest.skip("one SQLite connection writes the outbox: nothing else locks a row")
    spec = store_backend.spec
    inbox = await store_backend.inbox()
    outbox = store_backend.outbox(inbox, "holder")
    other = await asyncpg.connect(spec.url)
    try:
        for n in range(4):
            await inbox.accept(inbound(f"K-{n}", f"MSH|{n}".encode(), routes=("ehr",),
                                       patient_key="p1"))
        ids = [int(r[0]) for r in await other.fetch(
            f'SELECT id FROM "{spec.schema}".outbox ORDER BY id')]
        assert await outbox.lead("ehr")
        locking = other.transaction()
        await locking.start()
        await other.execute(f'SELECT 1 FROM "{spec.schema}".outbox WHERE id = $1 FOR UPDATE',
                            ids[1])
        first = await outbox.due("ehr", "mllp", 0, 10)
        assert [r.id for r in first] == ids[:1]
        await locking.rollback()
        rest = await outbox.due("ehr", "mllp", first[-1].id, 10)
        assert [r.id for r in rest] == ids[1:]
    finally:
        await other.close()
        if isinstance(outbox, PgOutbox):
            await outbox.close()
        await inbox.close()


async def test_a_row_committed_behind_the_cursor_is_read_before_its_patients_next_row(
        store_backend: Backend) -> None:
    """Ids are drawn at insert, rows seen at commit: a patient's row can commit after
    another patient's later row was read. The holder reads it then, and before the
    patient's next row (which commits after it)."""
    if store_backend.pool is None or store_backend.spec is None:
        pytest.skip("SQLite commits one writer at a time: ids become visible in order")
    spec = store_backend.spec
    first, second = await PgInbox.open(store_backend.pool), await PgInbox.open(store_backend.pool)
    outbox = store_backend.outbox(first, "holder")
    old = inbound("OLD-1", days_ago=8)  # past the duplicate window: its key is released
    await first.accept(old)
    blocker = await asyncpg.connect(spec.url)
    try:
        # The first instance's batch inserts a row of p1 (drawing its outbox id), then
        # waits, uncommitted, to release the old row's key, which another transaction
        # holds; meanwhile another instance commits a row of p2.
        await blocker.execute(f'SET search_path = "{spec.schema}"')
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("SELECT 1 FROM inbox WHERE control_id = 'OLD-1' FOR UPDATE")
        late = first.submit(inbound("LATE-1", routes=("ehr",), patient_key="p1"))
        resent = first.submit(inbound("OLD-1", days_ago=0))  # the same batch
        await eventually(lambda: _waits(blocker, spec), what="the first batch waiting")
        other = await second.accept(inbound("OTHER-1", routes=("ehr",), patient_key="p2"))
        assert await outbox.lead("ehr")
        [read] = await outbox.due("ehr", "mllp", 0, 10)
        assert read.inbox_id == other.inbox_id  # the p1 row is not committed yet
        await holding.rollback()
        stored_late = await late
        assert not (await resent).duplicate
        after = await second.accept(inbound("LATE-2", routes=("ehr",), patient_key="p1"))
        rows = await outbox.due("ehr", "mllp", read.id, 10)
        assert [r.inbox_id for r in rows] == [stored_late.inbox_id, after.inbox_id]
        assert rows[0].id < read.id  # behind the cursor, and still read, first
        assert await outbox.due("ehr", "mllp", rows[-1].id, 10) == []  # once
    finally:
        await blocker.close()
        if isinstance(outbox, PgOutbox):
            await outbox.close()
        await first.close()
        await second.close()


async def _waits(connection: asyncpg.Connection, spec: PgSpec) -> bool:
    return bool(await connection.fetchval(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE NOT l.granted AND a.application_name = $1", f"isthmus:{spec.schema}"))
