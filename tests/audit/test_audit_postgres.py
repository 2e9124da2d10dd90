"""The audit trail on PostgreSQL: several instances extend one chain, and `isthmus audit
verify` (reading the database the settings name) catches the tampering it catches in an
audit.db, by someone who can run SQL but does not hold the audit keys."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.app.audit import audit_keys
from gateway.audit.keys import AuditKeys
from gateway.audit.log import AuditLog
from gateway.store.pg.audit import PgAuditStore
from gateway.store.pg.connect import PgSpec, connect, open_pool
from support import postgres
from support.audit import T0, ingest_record, run_cli, settings_for, write_records


@dataclass
class Trail:
    spec: PgSpec
    pool: Any
    keys: AuditKeys
    data_dir: Path

    async def log(self, **kwargs: Any) -> AuditLog:
        """Another instance's log on the shared tables (the same keys, as they must be)."""
        store = await PgAuditStore.open(self.pool)
        return await AuditLog.open_store(store, self.keys, **kwargs)

    def verify(self, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
        monkeypatch.setenv("ISTHMUS_STORE__BACKEND", "postgresql")
        monkeypatch.setenv("ISTHMUS_STORE__URL", self.spec.url)
        monkeypatch.setenv("ISTHMUS_STORE__SCHEMA", self.spec.schema)
        code, out, err = run_cli("audit", "--data-dir", str(self.data_dir), "verify")
        return code, out + err


@pytest.fixture
async def trail(tmp_path: Path) -> AsyncIterator[Trail]:
    spec = await postgres.new_schema()
    pool = await open_pool(spec)
    data_dir = tmp_path / "var"
    keys = audit_keys(settings_for(data_dir), create=True)
    try:
        yield Trail(spec, pool, keys, data_dir)
    finally:
        await pool.close()
        await postgres.drop_schema(spec)


async def sql(trail: Trail, *statements: str) -> None:
    """As someone with SQL access: the append-only guard off, then the statements."""
    connection = await connect(trail.spec)
    try:
        await connection.execute("ALTER TABLE audit_record DISABLE TRIGGER audit_record_guard")
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def rechain(trail: Trail, from_seq: int) -> None:
    """Recompute the public chain hashes from `from_seq` (a forger without the key)."""
    connection = await connect(trail.spec)
    try:
        await connection.execute("ALTER TABLE audit_record DISABLE TRIGGER audit_record_guard")
        prev = await connection.fetchval("SELECT hash FROM audit_record WHERE seq = $1",
                                         from_seq - 1)
        for seq, body in await connection.fetch(
                "SELECT seq, body FROM audit_record WHERE seq >= $1 ORDER BY seq", from_seq):
            prev = hashlib.sha256(prev + seq.to_bytes(8, "big")
                                  + hashlib.sha256(body).digest()).digest()
            await connection.execute("UPDATE audit_record SET hash = $1 WHERE seq = $2",
                                     prev, seq)
    finally:
        await connection.close()


async def test_three_instances_appending_at_once_make_one_chain_that_verifies(
        trail: Trail, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = [await trail.log() for _ in range(3)]
    await asyncio.gather(*(write_records(log, 1 + 40 * n, 40 + 40 * n)
                           for n, log in enumerate(logs)))
    for log in logs:
        await log.close()
    code, out = trail.verify(monkeypatch)
    assert code == 0, out
    assert "audit trail intact: 120 records (1..120)" in out


async def test_the_records_are_append_only_for_ordinary_sql(trail: Trail) -> None:
    log = await trail.log()
    await write_records(log, 1, 2)
    await log.close()
    connection = await connect(trail.spec)
    try:
        with pytest.raises(Exception, match="append-only"):
            await connection.execute("UPDATE audit_record SET outcome = 'x' WHERE seq = 1")
        with pytest.raises(Exception, match="retention purge"):
            await connection.execute("DELETE FROM audit_record WHERE seq = 1")
    finally:
        await connection.close()


def _changed_body(trail: Trail) -> Awaitable[None]:
    return sql(trail, "UPDATE audit_record SET body = overlay(body placing 'X'::bytea "
                      "from 20 for 1) WHERE seq = 7")


def _deleted(trail: Trail) -> Awaitable[None]:
    return sql(trail, "DELETE FROM audit_record WHERE seq = 7")


def _truncated(trail: Trail) -> Awaitable[None]:
    return sql(trail, "DELETE FROM audit_record WHERE seq >= 11")


def _hidden_from_search(trail: Trail) -> Awaitable[None]:
    return sql(trail, "UPDATE audit_record SET client_id = 'SOMEONE|ELSE' WHERE seq = 7")


def _changed_hash(trail: Trail) -> Awaitable[None]:
    return sql(trail, "UPDATE audit_record SET hash = set_byte(hash, 0, get_byte(hash, 0) # 128) "
                      "WHERE seq = 7")


def _changed_mac(trail: Trail) -> Awaitable[None]:
    return sql(trail, "UPDATE audit_record SET mac = set_byte(mac, 3, get_byte(mac, 3) # 1) "
                      "WHERE seq = 7")


def _swapped(trail: Trail) -> Awaitable[None]:
    return sql(trail, "UPDATE audit_record SET seq = -1 WHERE seq = 7",
               "UPDATE audit_record SET seq = 7 WHERE seq = 8",
               "UPDATE audit_record SET seq = 8 WHERE seq = -1")


async def _inserted(trail: Trail) -> None:
    # A forged record slipped in as number 7, the rest moved up, the chain recomputed.
    await sql(trail, *(f"UPDATE audit_record SET seq = {seq + 1} WHERE seq = {seq}"
                       for seq in range(12, 6, -1)),
              "INSERT INTO audit_record SELECT 7, recorded_at, action, client_id, outcome, "
              "patient_index, patient_id_index, body, hash, mac, mac_key FROM audit_record "
              "WHERE seq = 3")
    await rechain(trail, 7)


async def _rewritten_tail(trail: Trail) -> None:
    await sql(trail, "UPDATE audit_record SET outcome = 'AR:207', body = convert_to(replace("
                     "convert_from(body, 'UTF8'), '\"outcome\":\"success\"', "
                     "'\"outcome\":\"AR:207\"'), 'UTF8') WHERE seq >= 7")
    await rechain(trail, 7)


# The same cases as the SQLite trail's (tests/audit/test_audit_chain.py), one for one.
TAMPERING: list[tuple[str, Callable[[Trail], Awaitable[None]], str]] = [
    ("one changed byte in a record", _changed_body, "record 7: its contents"),
    ("one changed byte in a chain hash", _changed_hash, "record 7: its contents"),
    ("a deleted record", _deleted, "record 7: it is missing"),
    ("two records swapped", _swapped, "record 7: its contents or position"),
    ("an inserted record", _inserted, "record 7:"),
    ("the tail truncated", _truncated, "record 11: records 11..12 are missing"),
    ("a search column altered", _hidden_from_search,
     "record 7: its search columns do not match"),
    ("the tail rewritten with recomputed hashes", _rewritten_tail, "record 7: its MAC"),
    ("one changed byte in a MAC", _changed_mac, "record 7: its MAC does not verify"),
]


@pytest.mark.parametrize(("case", "tamper", "first"), TAMPERING,
                         ids=[case for case, _, _ in TAMPERING])
async def test_tampering_is_detected_naming_the_first_bad_record(
        trail: Trail, monkeypatch: pytest.MonkeyPatch, case: str,
        tamper: Callable[[Trail], Awaitable[None]], first: str) -> None:
    one, two = await trail.log(), await trail.log()
    await write_records(one, 1, 6)
    await write_records(two, 7, 12)
    await one.close()
    await two.close()
    await tamper(trail)
    code, out = trail.verify(monkeypatch)
    assert code == 1, out
    assert out.startswith("audit trail NOT intact: ")
    assert out.splitlines()[0].removeprefix("audit trail NOT intact: ").startswith(first), out


async def test_retention_purge_by_one_instance_keeps_the_chain_going_for_all(
        trail: Trail, monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = await trail.log(), await trail.log()
    await write_records(one, 1, 10)
    await one.checkpoint()
    assert await one.purge(T0 + timedelta(minutes=5, seconds=30)) == 5
    await write_records(two, 11, 14)  # the other instance links after the purge
    await two.record(ingest_record(15))
    await one.close()
    await two.close()
    code, out = trail.verify(monkeypatch)
    assert code == 0, out
    assert "10 records (6..15)" in out and "records 1..5 purged by retention" in out


async def test_checkpoints_cannot_be_forged_or_altered(
        trail: Trail, monkeypatch: pytest.MonkeyPatch) -> None:
    log = await trail.log()
    await write_records(log, 1, 5)
    await log.checkpoint()
    await write_records(log, 6, 8)
    await log.close()
    await sql(trail, "UPDATE audit_checkpoint SET body = convert_to(replace(convert_from("
                     "body, 'UTF8'), '\"count\":5', '\"count\":4'), 'UTF8') WHERE count = 5")
    code, out = trail.verify(monkeypatch)
    assert code == 1, out
    assert "checkpoint at record 4: its signature does not verify" in out
