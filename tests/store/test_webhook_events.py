"""The recorded webhook events, on SQLite and on PostgreSQL: one row per backend and event
id, claims in receipt order held by a lease, retries and outcomes, the resource sealed."""

from __future__ import annotations

import asyncio

from gateway.store.pg.webhooks import PgWebhookEvents
from gateway.store.sealing import DataKey, KeyRing, SealedCodec
from gateway.store.webhooks import SqliteWebhookEvents, WebhookEvents
from support.backends import Backend


async def open_events(backend: Backend, codec: SealedCodec | None = None) -> WebhookEvents:
    if backend.pool is None:
        if codec is None:
            return await SqliteWebhookEvents.open(backend.tmp / "webhooks.db", "normal")
        return await SqliteWebhookEvents.open(backend.tmp / "webhooks.db", "normal", codec)
    return PgWebhookEvents(backend.pool) if codec is None else PgWebhookEvents(
        backend.pool, codec)


async def test_an_event_id_is_recorded_once_per_backend(store_backend: Backend) -> None:
    events = await open_events(store_backend)
    try:
        assert await events.record("ehr", "e1", "resource.updated", "Patient", "Patient/p1")
        assert not await events.record("ehr", "e1", "resource.updated", "Patient",
                                       "Patient/p2")
        assert await events.record("other", "e1", "resource.updated", "Patient", "Patient/p1")
        rows = await events.rows()
        assert [(r.backend, r.event_id, r.status) for r in rows] == [
            ("ehr", "e1", "pending"), ("other", "e1", "pending")]
    finally:
        await events.close()


async def test_claims_are_in_order_and_held_for_the_lease(store_backend: Backend) -> None:
    events = await open_events(store_backend)
    try:
        for n in range(3):
            await events.record("ehr", f"e{n}", "k", "Appointment", f"Appointment/a{n}")
        first = await events.claim(2, lease=60)
        assert [e.event_id for e in first] == ["e0", "e1"]
        assert first[0].resource == "Appointment/a0" and first[0].attempts == 0
        second = await events.claim(10, lease=60)
        assert [e.event_id for e in second] == ["e2"]  # the others are held
        assert await events.claim(10, lease=60) == []
    finally:
        await events.close()


async def test_a_retry_waits_and_counts_and_a_finish_ends_it(store_backend: Backend) -> None:
    events = await open_events(store_backend)
    try:
        await events.record("ehr", "e1", "k", "Patient", "Patient/p1")
        [event] = await events.claim(1, lease=60)
        await events.retry(event.id, 3600, "HTTP 503")
        assert await events.claim(1, lease=60) == []  # not due for an hour
        due = await events.next_due()
        assert due is not None and due > 3000
        [row] = await events.rows()
        assert (row.status, row.attempts, row.reason) == ("pending", 1, "HTTP 503")
        await events.record("ehr", "e2", "k", "Patient", "Patient/p2")
        [other] = await events.claim(1, lease=60)
        await events.finish(other.id, "done", "unchanged")
        assert [r.status for r in await events.rows("done")] == ["done"]
        assert await events.rows("failed") == []
    finally:
        await events.close()


async def test_concurrent_claims_never_share_an_event(store_backend: Backend) -> None:
    events = await open_events(store_backend)
    try:
        for n in range(20):
            await events.record("ehr", f"e{n}", "k", "Patient", f"Patient/p{n}")
        batches = await asyncio.gather(*(events.claim(3, lease=60) for _ in range(10)))
        claimed = [e.event_id for batch in batches for e in batch]
        assert sorted(claimed) == sorted(f"e{n}" for n in range(20))
    finally:
        await events.close()


async def test_sqlite_claims_end_with_the_process(store_backend: Backend) -> None:
    if store_backend.pool is not None:
        return  # PostgreSQL: a claim lasts its lease (another instance may be alive)
    events = await open_events(store_backend)
    await events.record("ehr", "e1", "k", "Patient", "Patient/p1")
    assert len(await events.claim(1, lease=600)) == 1
    await events.close()
    reopened = await open_events(store_backend)
    try:
        assert [e.event_id for e in await reopened.claim(1, lease=600)] == ["e1"]
    finally:
        await reopened.close()


async def test_the_resource_reference_is_sealed(store_backend: Backend) -> None:
    codec = SealedCodec(KeyRing((DataKey.from_secret("k1", b"s" * 32),)), "k1")
    events = await open_events(store_backend, codec)
    try:
        await events.record("ehr", "e1", "k", "Patient", "Patient/qzxsealcanary")
        [event] = await events.claim(1, lease=60)
        assert event.resource == "Patient/qzxsealcanary"
    finally:
        await events.close()
    if store_backend.pool is None:
        for path in store_backend.tmp.glob("webhooks.db*"):
            assert b"qzxsealcanary" not in path.read_bytes()
    else:
        stored = await store_backend.pool.fetchval("SELECT resource FROM webhook_event")
        assert b"qzxsealcanary" not in bytes(stored)


async def test_claims_and_due_times_per_backend(store_backend: Backend) -> None:
    """One backend's fetcher claims only its own events, in receipt order; the other's
    wait for theirs (a backend that is down holds nothing of another's)."""
    events = await open_events(store_backend)
    try:
        for n, backend in enumerate(["a", "b", "a", "b"]):
            await events.record(backend, f"e{n}", "resource.updated", "Patient",
                                f"Patient/p{n}")
        mine = await events.claim(10, lease=60, backend="b")
        assert [(e.backend, e.event_id) for e in mine] == [("b", "e1"), ("b", "e3")]
        assert await events.claim(10, lease=60, backend="b") == []
        assert await events.next_due("a") == 0.0
        due_b = await events.next_due("b")
        assert due_b is not None and due_b > 30  # held for the lease
        theirs = await events.claim(10, lease=60, backend="a")
        assert [e.event_id for e in theirs] == ["e0", "e2"]
        assert await events.next_due("nobody") is None
    finally:
        await events.close()


async def test_events_of_a_backend_that_left_the_config_are_failed_on_sqlite_only(
        store_backend: Backend) -> None:
    """One process owns an SQLite data dir, so its config is the only one; on the shared
    database another instance may still have the backend (a config rolling out)."""
    events = await open_events(store_backend)
    embedded = store_backend.pool is None
    try:
        await events.record("kept", "e1", "resource.updated", "Patient", "Patient/p1")
        await events.record("gone", "e2", "resource.updated", "Patient", "Patient/p2")
        assert await events.abandon(["kept"], "backend not configured") == int(embedded)
        rows = {r.backend: (r.status, r.reason) for r in await events.rows()}
        assert rows == {"kept": ("pending", ""),
                        "gone": ("failed", "backend not configured") if embedded
                        else ("pending", "")}
        assert await events.abandon(["kept"], "backend not configured") == 0
    finally:
        await events.close()
