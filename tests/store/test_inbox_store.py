"""The inbox on both backends: the ACK stored with its message, duplicates decided by the
store (also between two instances on one PostgreSQL database), conflicts kept apart,
group commit, the duplicate window."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from gateway.store.inbox import CONFLICT, FAILED
from gateway.store.pg.inbox import PgInbox
from support.backends import Backend, inbound
from support.wait import eventually


async def test_the_ack_is_stored_with_the_message_and_a_resend_gets_it_back(
        store_backend: Backend) -> None:
    inbox = await store_backend.inbox()
    try:
        first = await inbox.accept(inbound("C-1", b"MSH|one", b"ACK-one"))
        again = await inbox.accept(inbound("C-1", b"MSH|one", b"ACK-later"))
        assert not first.duplicate and again.duplicate
        assert again.ack == b"ACK-one" and again.inbox_id == first.inbox_id
        entry = await inbox.get(first.inbox_id)
        assert entry is not None and entry[1:] == (b"MSH|one", b"ACK-one")
        other = await inbox.accept(inbound("C-1", sender="OTHER"))
        assert not other.duplicate
        assert await inbox.count() == 2
    finally:
        await inbox.close()


async def test_concurrent_messages_share_commits_and_duplicates_store_once(
        store_backend: Backend) -> None:
    inbox = await store_backend.inbox()
    try:
        messages = [inbound(f"G-{n % 40}", f"MSH|{n % 40}".encode()) for n in range(200)]
        stored = await asyncio.gather(*(inbox.accept(m) for m in messages))
        assert sum(not s.duplicate for s in stored) == 40
        assert await inbox.count() == 40
        assert inbox.batches_committed < 200
        by_key = {m.control_id: s.inbox_id for m, s in zip(messages, stored, strict=True)
                  if not s.duplicate}
        assert all(by_key[m.control_id] == s.inbox_id
                   for m, s in zip(messages, stored, strict=True))
    finally:
        await inbox.close()


async def test_another_message_under_a_used_control_id_is_a_conflict(
        store_backend: Backend) -> None:
    inbox = await store_backend.inbox()
    try:
        await inbox.accept(inbound("X-1", b"MSH|a", content_hash="a", routes=("ehr",)))
        conflict = await inbox.accept(inbound("X-1", b"MSH|b", content_hash="b",
                                              routes=("ehr",)))
        assert conflict.conflict and conflict.ack == b"ACK-conflict"
        resent = await inbox.accept(inbound("X-1", b"MSH|b", content_hash="b"))
        assert resent.conflict and resent.inbox_id == conflict.inbox_id
        entries = await inbox.list(status=CONFLICT)
        assert [e.id for e in entries] == [conflict.inbox_id]
        outbox = store_backend.outbox(inbox)
        assert await outbox.pending_counts() == {"ehr": 1}  # the conflict makes none
    finally:
        await inbox.close()


async def test_the_duplicate_window_expires(store_backend: Backend) -> None:
    inbox = await store_backend.inbox(window=timedelta(days=7))
    try:
        old = await inbox.accept(inbound("OLD-1", ack=b"ACK-old", days_ago=8))
        fresh = await inbox.accept(inbound("OLD-1", ack=b"ACK-new"))
        assert not fresh.duplicate and fresh.inbox_id != old.inbox_id
        assert (await inbox.accept(inbound("OLD-1"))).ack == b"ACK-new"
        await inbox.set_statuses([(old.inbox_id, FAILED, "PID-3: missing")])
        [(row_id, raw, _)] = await inbox.with_status(FAILED)
        assert row_id == old.inbox_id and raw == b"MSH|raw"
    finally:
        await inbox.close()


async def test_routed_messages_make_outbox_rows_in_the_same_commit(store_backend: Backend) -> None:
    inbox = await store_backend.inbox()
    try:
        await asyncio.gather(*(inbox.accept(inbound(f"R-{n}", routes=("ehr", "lab"),
                                                    patient_key=f"p{n % 3}"))
                               for n in range(30)))
        await inbox.accept(inbound("R-0", routes=("ehr", "lab")))  # a resend: no rows
        outbox = store_backend.outbox(inbox)
        assert await outbox.pending_counts() == {"ehr": 30, "lab": 30}
    finally:
        await inbox.close()


async def test_two_instances_receiving_one_message_at_once_store_it_once(
        store_backend: Backend) -> None:
    if store_backend.pool is None:
        pytest.skip("one SQLite inbox per data dir: the dir's lock keeps a second out")
    first, second = await PgInbox.open(store_backend.pool), await PgInbox.open(store_backend.pool)
    try:
        for n in range(20):
            message = inbound(f"TWICE-{n}", f"MSH|{n}".encode(), f"ACK-{n}".encode(),
                              routes=("ehr",))
            a, b = await asyncio.gather(first.accept(message), second.accept(message))
            assert a.inbox_id == b.inbox_id and a.ack == b.ack
            assert sorted([a.duplicate, b.duplicate]) == [False, True]
        assert await first.count() == 20
        assert (await store_backend.outbox(first).pending_counts()) == {"ehr": 20}
    finally:
        await first.close()
        await second.close()


async def test_one_patients_rows_commit_in_id_order_across_instances(
        store_backend: Backend) -> None:
    """Outbox rows go out in id order per patient, so a row must never become visible
    after a later row of its patient: an instance whose insert has drawn its ids but not
    committed holds the patient's next message at the other instance until it does."""
    if store_backend.pool is None:
        pytest.skip("one SQLite inbox per data dir: its commits are already in order")
    spec = store_backend.spec
    assert spec is not None
    first, second = await PgInbox.open(store_backend.pool), await PgInbox.open(store_backend.pool)
    earlier = inbound("ORDER-1", routes=("ehr",), patient_key="p1")
    later = inbound("ORDER-2", routes=("ehr",), patient_key="p1")
    # Another transaction holds the first message's duplicate key, uncommitted: the
    # first instance's INSERT draws its ids, then waits for that transaction to end.
    blocker = await asyncpg.connect(spec.url)
    watcher = await asyncpg.connect(spec.url)
    finished: list[str] = []
    try:
        await blocker.execute(f'SET search_path = "{spec.schema}"')
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute(
            "INSERT INTO inbox (received_at, sending_application, sending_facility, "
            "control_id, message_type, version, peer, size, status, raw, ack, dedup_key) "
            "VALUES ('2026-01-01T00:00:00.000000Z', 'APP', 'FAC', 'ORDER-1', 'ADT^A01', "
            "'2.5', 'peer', 1, 'received', 'x', 'x', $1)", earlier.dedup_key)

        async def waiting(kind: str) -> bool:
            return bool(await watcher.fetchval(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE NOT l.granted AND l.locktype = $1 AND a.application_name = $2",
                kind, f"isthmus:{spec.schema}"))

        a = asyncio.ensure_future(first.accept(earlier))
        a.add_done_callback(lambda _: finished.append("earlier"))
        await eventually(lambda: waiting("transactionid"), what="the first insert waiting")
        b = asyncio.ensure_future(second.accept(later))
        b.add_done_callback(lambda _: finished.append("later"))
        await eventually(lambda: b.done() or waiting("advisory"),
                         what="the second instance committing or waiting")
        await holding.rollback()
        stored_earlier, stored_later = await a, await b
        assert finished == ["earlier", "later"]  # committed in id order
        assert stored_earlier.inbox_id < stored_later.inbox_id
        rows = await watcher.fetch(
            f'SELECT inbox_id FROM "{spec.schema}".outbox ORDER BY id')
        assert [r[0] for r in rows] == [stored_earlier.inbox_id, stored_later.inbox_id]
    finally:
        await blocker.close()
        await watcher.close()
        await first.close()
        await second.close()
