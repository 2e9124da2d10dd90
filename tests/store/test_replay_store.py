"""Used client-assertion ids on both backends: kept until they expire and loaded back at
start; on PostgreSQL an id used at one instance is refused at every other."""

from __future__ import annotations

import time

import pytest

from gateway.edge.auth_server import ReplayCache
from gateway.store.pg.replay import PgReplayStore
from support.backends import Backend


async def test_ids_are_kept_until_they_expire_and_load_back(store_backend: Backend) -> None:
    store = await store_backend.replay_store()
    try:
        now = time.time()
        await store.add(b"k" * 32, now + 60)
        await store.add(b"e" * 32, now - 1)  # already expired: gone at the next load
        assert await store.unexpired() == [(b"k" * 32, pytest.approx(now + 60))]
        cache = ReplayCache()
        cache.attach(store, await store.unexpired())
        assert not await cache.first_use(b"k" * 32, now + 60)
        assert await cache.first_use(b"n" * 32, now + 60)
    finally:
        await store.close()


async def test_an_assertion_used_at_one_instance_is_refused_at_another(
        store_backend: Backend) -> None:
    if store_backend.pool is None:
        pytest.skip("one gateway per SQLite data dir")
    one, two = ReplayCache(), ReplayCache()
    one.attach(PgReplayStore(store_backend.pool), [])
    two.attach(PgReplayStore(store_backend.pool), [])
    key = ReplayCache.key("client-1", "jti-1")
    assert await one.first_use(key, time.time() + 60)
    assert not await two.first_use(key, time.time() + 60)
