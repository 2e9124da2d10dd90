"""Change events on PostgreSQL: the reader never passes an event whose transaction may
still be followed by a lower seq committing late; a PG-backed gateway delivers webhooks
and Subscriptions; two instances on one database deliver each event once."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from conftest import RunningGateway
from gateway.app.audit import audit_keys
from gateway.app.events import EVENT_LEADER
from gateway.store.pg.connect import PgSpec, open_pool
from gateway.store.pg.events import PgEventLog
from gateway.store.pg.outbox import PgOutbox
from support import postgres
from support.audit import settings_for
from support.fhir import fhir_session, start_fhir_gateway
from support.subscriber import SECRET, WEBHOOK_SECRET, Subscriber
from support.wait import eventually

pg_spec = postgres.pg_spec
FAST = {"events.poll_interval": 0.02, "forward.poll_interval": 0.05,
        "events.outbox_poll_interval": 0.05, "events.leader_retry": 0.1,
        "events.retry_base": 0.02, "events.retry_max_delay": 0.05,
        "events.client_secret_env": {"fhir-tests": "ISTHMUS_TEST_SUB_SECRET"}}


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISTHMUS_TEST_HOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("ISTHMUS_TEST_SUB_SECRET", SECRET)


def _hook(url: str) -> dict[str, Any]:
    return {"name": "crm", "url": url, "events": ["observation.created"],
            "secret_env": "ISTHMUS_TEST_HOOK_SECRET", "payload": "ids"}


def _observation(text: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": text},
            "subject": {"reference": "Patient/pg1"}}


async def _insert(connection: asyncpg.Connection, id_: str) -> None:
    await connection.execute(
        "INSERT INTO fhir_resource (type, id, version, last_updated, deleted, body) "
        "VALUES ('Basic', $1, 1, '2026-01-01T00:00:00.000Z', 0, $2)", id_,
        b'{"resourceType":"Basic","id":"' + id_.encode() + b'"}')


async def test_an_event_is_not_read_past_a_lower_seq_still_uncommitted(
        pg_spec: PgSpec) -> None:
    pool = await open_pool(pg_spec)
    early = await asyncpg.connect(pg_spec.url, server_settings={"search_path": pg_spec.schema})
    late = await asyncpg.connect(pg_spec.url, server_settings={"search_path": pg_spec.schema})
    try:
        log = PgEventLog(pool)
        open_tx = early.transaction()
        await open_tx.start()
        await _insert(early, "first")  # seq 1, not committed yet
        await _insert(late, "second")  # seq 2, committed
        # Seq 2 is committed, but seq 1's transaction runs: reading 2 now would move a
        # cursor past 1 for good.
        assert await log.after(0, 10) == []
        assert await log.last_seq() == 0
        await open_tx.commit()
        read = await log.after(0, 10)
        assert [(e.seq, e.id) for e in read] == [(1, "first"), (2, "second")]
        [first, _] = await log.with_bodies(read)
        assert b'"first"' in first.body
    finally:
        await early.close()
        await late.close()
        await pool.close()


async def _pg_gateway(tmp_path: Path, name: str, spec: PgSpec, keys: Path,
                      **overrides: Any) -> RunningGateway:
    return await start_fhir_gateway(tmp_path / name, **{
        **FAST, "store.backend": "postgresql", "store.url": spec.url,
        "store.schema": spec.schema, "audit.key_file": keys / "keys" / "audit-data.keys",
        "audit.signing_key_file": keys / "keys" / "audit-signing.pem", **overrides})


async def _post(gateway: RunningGateway, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with fhir_session(gateway) as session, session.post(path, json=body) as resp:
        assert resp.status == 201, await resp.text()
        return dict(await resp.json())


async def test_webhook_and_subscription_are_notified_from_postgresql(
        tmp_path: Path, pg_spec: PgSpec, subscriber: Subscriber) -> None:
    keys = tmp_path / "keys-home"
    audit_keys(settings_for(keys), create=True)
    gateway = await _pg_gateway(tmp_path, "a", pg_spec, keys, webhooks=[_hook(subscriber.url)])
    try:
        subscription = {"resourceType": "Subscription", "status": "requested",
                        "reason": "tests", "criteria": "Observation?status=final",
                        "channel": {"type": "rest-hook", "endpoint": subscriber.url,
                                    "payload": "application/fhir+json"}}
        created = await _post(gateway, "/fhir/Subscription", subscription)

        async def active() -> bool:
            async with fhir_session(gateway) as session, session.get(
                    f"/fhir/Subscription/{created['id']}") as got:
                return bool((await got.json())["status"] == "active")

        await eventually(active, timeout=20, what="the Subscription to become active")
        observation = await _post(gateway, "/fhir/Observation", _observation("K"))
        event_id = f"Observation/{observation['id']}/_history/1"
        await eventually(lambda: len(subscriber.accepted()) == 2, timeout=20)
        by_kind = {n.headers["Content-Type"].split(";")[0]: n for n in subscriber.accepted()}
        hook, note = by_kind["application/json"], by_kind["application/fhir+json"]
        assert hook.signed_with(WEBHOOK_SECRET) and hook.event_id == event_id
        assert hook.json["event"] == "observation.created"
        assert note.signed_with(SECRET) and note.event_id == event_id
        assert note.json["entry"][0]["resource"]["id"] == observation["id"]
    finally:
        await gateway.runner.cleanup()


async def test_two_instances_on_one_database_deliver_each_event_once(
        tmp_path: Path, pg_spec: PgSpec, subscriber: Subscriber) -> None:
    keys = tmp_path / "keys-home"
    audit_keys(settings_for(keys), create=True)
    hooks = [_hook(subscriber.url)]
    first = await _pg_gateway(tmp_path, "a", pg_spec, keys, webhooks=hooks)
    second = await _pg_gateway(tmp_path, "b", pg_spec, keys, webhooks=hooks)
    try:
        written = []
        for index in range(12):
            gateway = (first, second)[index % 2]  # writes from both instances
            written.append((await _post(gateway, "/fhir/Observation",
                                        _observation(f"T{index}")))["id"])
        await eventually(lambda: len(subscriber.accepted()) >= 12, timeout=30)
        connection = await asyncpg.connect(pg_spec.url,
                                           server_settings={"search_path": pg_spec.schema})
        try:
            async def all_delivered() -> bool:
                return int(await connection.fetchval(
                    "SELECT count(*) FROM outbox WHERE status <> 'delivered'")) == 0

            await eventually(all_delivered, timeout=20)
            rows = int(await connection.fetchval("SELECT count(*) FROM outbox"))
        finally:
            await connection.close()
        assert rows == 12  # one outbox row per event, whoever wrote it
        ids = [n.event_id for n in subscriber.accepted()]
        assert sorted(ids) == sorted(f"Observation/{i}/_history/1" for i in written)
        assert len(subscriber.notifications) == 12  # none sent twice
        leaders = [g for g in (first, second) if g.app[EVENT_LEADER].pump is not None]
        assert len(leaders) == 1
    finally:
        await first.runner.cleanup()
        await second.runner.cleanup()


async def test_purge_takes_only_handled_events_older_than_the_retention(
        pg_spec: PgSpec) -> None:
    pool = await open_pool(pg_spec)
    connection = await asyncpg.connect(pg_spec.url,
                                       server_settings={"search_path": pg_spec.schema})
    try:
        for id_ in ("a", "b", "c"):
            await _insert(connection, id_)  # at 2026-01-01
        await connection.execute("INSERT INTO store_meta (key, value) "
                                 "VALUES ('events_cursor', '2')")
        log = PgEventLog(pool)
        assert await log.purge(datetime(2025, 12, 31, tzinfo=UTC)) == 0  # younger
        assert await log.purge(datetime(2026, 2, 1, tzinfo=UTC)) == 2
        left = await log.after(0, 10)
        assert [e.id for e in left] == ["c"]  # not handled yet: kept
        await _insert(connection, "d")
        assert [e.seq for e in await log.after(2, 10)] == [3, 4]  # no seq drawn again
    finally:
        await connection.close()
        await pool.close()


async def test_a_detached_target_frees_its_outbox_lead_for_another_instance(
        pg_spec: PgSpec) -> None:
    pool = await open_pool(pg_spec)
    first, second = PgOutbox(pool, pg_spec, "a"), PgOutbox(pool, pg_spec, "b")
    try:
        assert await first.lead("webhook:crm")
        assert not await second.lead("webhook:crm")
        await first.resign("webhook:crm")
        assert await second.lead("webhook:crm")
        assert not await first.lead("webhook:crm")
    finally:
        await first.close()
        await second.close()
        await pool.close()


async def test_when_the_leading_instance_stops_the_other_takes_over(
        tmp_path: Path, pg_spec: PgSpec, subscriber: Subscriber) -> None:
    keys = tmp_path / "keys-home"
    audit_keys(settings_for(keys), create=True)
    hooks = [_hook(subscriber.url)]
    first = await _pg_gateway(tmp_path, "a", pg_spec, keys, webhooks=hooks)
    second = await _pg_gateway(tmp_path, "b", pg_spec, keys, webhooks=hooks)
    stopped = False
    try:
        assert first.app[EVENT_LEADER].pump is not None  # the first to start leads
        assert second.app[EVENT_LEADER].pump is None
        await _post(second, "/fhir/Observation", _observation("before"))
        await eventually(lambda: len(subscriber.accepted()) == 1, timeout=20)
        await first.runner.cleanup()
        stopped = True
        await eventually(lambda: second.app[EVENT_LEADER].pump is not None, timeout=20)
        after = await _post(second, "/fhir/Observation", _observation("after"))
        await eventually(lambda: len(subscriber.accepted()) == 2, timeout=20)
        assert subscriber.accepted()[1].event_id == f"Observation/{after['id']}/_history/1"
        assert len(subscriber.notifications) == 2
    finally:
        if not stopped:
            await first.runner.cleanup()
        await second.runner.cleanup()
