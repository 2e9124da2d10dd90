"""Tamper evidence of the live audit trail: every kind of alteration is found, naming the
first bad record, by `isthmus audit verify` (exit 0 only for an intact log)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.audit.keys import AuditKeyError
from gateway.audit.log import verify_store
from gateway.store.errors import StoreUnavailable
from support.audit import (
    AUDIT_DB,
    T0,
    attacker,
    ingest_record,
    open_log,
    rechain,
    run_cli,
    write_records,
)
from support.wait import eventually


async def make_log(data_dir: Path, records: int = 12,
                   checkpoints: tuple[int, ...] = (5, 10)) -> None:
    """Records 1..N with signed checkpoints where given and at the end (clean close)."""
    log = await open_log(data_dir)
    written = 0
    for at in (*checkpoints, records):
        await write_records(log, written + 1, at)
        written = at
        await log.checkpoint()
    await log.close()


def verify(data_dir: Path) -> tuple[int, str]:
    code, out, err = run_cli("audit", "--data-dir", str(data_dir), "verify")
    return code, out + err


@pytest.fixture
async def log_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "var"
    await make_log(data_dir)
    return data_dir


async def test_an_intact_log_verifies_with_exit_0(log_dir: Path) -> None:
    code, out = verify(log_dir)
    assert code == 0, out
    assert "audit trail intact: 12 records (1..12)" in out
    assert "signed through record 12" in out


def _change_body_byte(db: sqlite3.Connection) -> None:
    body = bytearray(db.execute("SELECT body FROM audit_record WHERE seq = 7").fetchone()[0])
    body[body.index(b"CTRL-0007") + 5] ^= 0x01  # one byte
    db.execute("UPDATE audit_record SET body = ? WHERE seq = 7", (bytes(body),))


def _change_hash_byte(db: sqlite3.Connection) -> None:
    digest = bytearray(db.execute("SELECT hash FROM audit_record WHERE seq = 7").fetchone()[0])
    digest[0] ^= 0x80
    db.execute("UPDATE audit_record SET hash = ? WHERE seq = 7", (bytes(digest),))


def _delete(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM audit_record WHERE seq = 7")


def _reorder(db: sqlite3.Connection) -> None:
    db.execute("UPDATE audit_record SET seq = -1 WHERE seq = 7")
    db.execute("UPDATE audit_record SET seq = 7 WHERE seq = 8")
    db.execute("UPDATE audit_record SET seq = 8 WHERE seq = -1")


def _insert(db: sqlite3.Connection) -> None:
    # A forged record slipped in as number 7, the rest moved up, the chain recomputed.
    for seq in range(12, 6, -1):
        db.execute("UPDATE audit_record SET seq = ? WHERE seq = ?", (seq + 1, seq))
    db.execute("INSERT INTO audit_record SELECT 7, recorded_at, action, client_id, outcome, "
               "patient_index, patient_id_index, body, hash, mac, mac_key FROM audit_record "
               "WHERE seq = 3")
    rechain(db, 7)


def _truncate(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM audit_record WHERE seq > 10")


def _rewrite_signed_tail(db: sqlite3.Connection) -> None:
    # Records 7.. changed and the chain recomputed to the end: the public hashes agree
    # again, but neither the MACs nor the signed checkpoints do.
    for seq in range(7, 13):
        body = db.execute("SELECT body FROM audit_record WHERE seq = ?", (seq,)).fetchone()[0]
        db.execute("UPDATE audit_record SET body = ? WHERE seq = ?",
                   (body.replace(b'"outcome":"success"', b'"outcome":"AR:207"'), seq))
    db.execute("UPDATE audit_record SET outcome = 'AR:207' WHERE seq >= 7")
    rechain(db, 7)


def _change_mac_byte(db: sqlite3.Connection) -> None:
    mac = bytearray(db.execute("SELECT mac FROM audit_record WHERE seq = 7").fetchone()[0])
    mac[3] ^= 0x01
    db.execute("UPDATE audit_record SET mac = ? WHERE seq = 7", (bytes(mac),))


def _hide_from_search(db: sqlite3.Connection) -> None:
    db.execute("UPDATE audit_record SET client_id = 'SOMEONE|ELSE' WHERE seq = 7")


TAMPERING: list[tuple[str, Callable[[sqlite3.Connection], None], str]] = [
    ("one changed byte in a record", _change_body_byte, "record 7: its contents"),
    ("one changed byte in a chain hash", _change_hash_byte, "record 7: its contents"),
    ("a deleted record", _delete, "record 7: it is missing"),
    ("two records swapped", _reorder, "record 7: its contents or position"),
    ("an inserted record", _insert, "record 7:"),
    ("the tail truncated", _truncate, "record 11: records 11..12 are missing"),
    ("the tail rewritten with recomputed hashes", _rewrite_signed_tail,
     "record 7: its MAC does not verify"),
    ("one changed byte in a MAC", _change_mac_byte, "record 7: its MAC does not verify"),
    ("a search column altered", _hide_from_search,
     "record 7: its search columns do not match"),
]


@pytest.mark.parametrize(("case", "tamper", "first"), TAMPERING,
                         ids=[case for case, _, _ in TAMPERING])
async def test_tampering_is_detected_naming_the_first_bad_record(
        log_dir: Path, case: str, tamper: Callable[[sqlite3.Connection], None],
        first: str) -> None:
    with attacker(log_dir) as db:
        tamper(db)
    code, out = verify(log_dir)
    assert code == 1, out
    assert out.startswith("audit trail NOT intact: ")
    assert out.splitlines()[0].removeprefix("audit trail NOT intact: ").startswith(first), out


async def test_a_tail_rewritten_after_the_last_signed_checkpoint_is_detected(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    await make_log(data_dir, records=10, checkpoints=())
    # Records 11..14 are written by a process that stops before it signs (a crash).
    tool = await open_log(data_dir, gateway=False)
    await write_records(tool, 11, 14)
    await tool.close()
    assert verify(data_dir)[0] == 0
    with attacker(data_dir) as db:
        body = db.execute("SELECT body FROM audit_record WHERE seq = 12").fetchone()[0]
        db.execute("UPDATE audit_record SET body = ? WHERE seq = 12",
                   (body.replace(b"CTRL-0012", b"CTRL-9999"),))
        rechain(db, 12)
    code, out = verify(data_dir)
    assert code == 1
    assert "record 12: its MAC does not verify" in out.splitlines()[0]


async def test_checkpoints_cannot_be_forged_or_altered(log_dir: Path) -> None:
    with attacker(log_dir) as db:
        body = db.execute("SELECT body FROM audit_checkpoint WHERE count = 5").fetchone()[0]
        db.execute("UPDATE audit_checkpoint SET body = ? WHERE count = 5",
                   (body.replace(b'"count":5', b'"count":4'),))
    code, out = verify(log_dir)
    assert code == 1
    assert "checkpoint at record 4: its signature does not verify" in out


async def test_verify_with_the_public_key_alone_checks_chain_and_signatures(
        log_dir: Path) -> None:
    code, public_pem, _ = run_cli("audit", "--data-dir", str(log_dir), "public-key")
    assert code == 0 and public_pem.startswith("-----BEGIN PUBLIC KEY-----")
    key = log_dir.parent / "audit.pub.pem"
    key.write_text(public_pem)
    code, out, _ = run_cli("audit", "--data-dir", str(log_dir), "verify", "--public-key",
                           str(key))
    assert code == 0 and "MACs not checked" in out and "intact" in out
    with attacker(log_dir) as db:
        _truncate(db)
    code, out, _ = run_cli("audit", "--data-dir", str(log_dir), "verify", "--public-key",
                           str(key))
    assert code == 1 and "record 11" in out


async def test_retention_purge_keeps_the_chain_verifiable(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    log = await open_log(data_dir)
    await write_records(log, 1, 20)  # one a minute from T0
    await log.checkpoint()
    deleted = await log.purge(T0 + timedelta(minutes=8, seconds=30))
    assert deleted == 8
    await write_records(log, 21, 25)
    await log.close()
    code, out = verify(data_dir)
    assert code == 0, out
    assert "17 records (9..25)" in out and "records 1..8 purged by retention" in out
    # Purging again, and then everything, still verifies; the chain goes on afterwards.
    log = await open_log(data_dir)
    assert await log.purge(T0 + timedelta(days=1)) == 17
    await write_records(log, 26, 27)
    await log.close()
    code, out = verify(data_dir)
    assert code == 0, out
    assert "2 records (26..27)" in out
    # Removing a record the purge kept is still a deletion.
    with attacker(data_dir) as db:
        db.execute("DELETE FROM audit_record WHERE seq = 26")
    code, out = verify(data_dir)
    assert code == 1 and "record 26: it is missing" in out


async def test_the_log_is_append_only_for_ordinary_sql(log_dir: Path) -> None:
    with sqlite3.connect(log_dir / AUDIT_DB) as db:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE audit_record SET outcome = 'x' WHERE seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="retention purge"):
            db.execute("DELETE FROM audit_record WHERE seq = 1")


async def test_another_process_appending_is_checked_and_followed(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    gateway = await open_log(data_dir)
    await write_records(gateway, 1, 3)
    tool = await open_log(data_dir, gateway=False)  # the command line, beside it
    await write_records(tool, 4, 5)
    await tool.close()
    await write_records(gateway, 6, 8)  # the gateway's head moves past the tool's rows
    await gateway.close()
    code, out = verify(data_dir)
    assert code == 0 and "8 records (1..8)" in out and "signed through record 8" in out


async def test_rows_appended_without_the_key_stop_the_writer(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    gateway = await open_log(data_dir)
    await write_records(gateway, 1, 3)
    with attacker(data_dir) as db:
        db.execute("INSERT INTO audit_record SELECT 4, recorded_at, action, client_id, "
                   "outcome, patient_index, patient_id_index, body, hash, mac, mac_key "
                   "FROM audit_record WHERE seq = 3")
        rechain(db, 4)
    with pytest.raises(StoreUnavailable, match="record 4"):
        await gateway.record(ingest_record(5))
    await gateway.close()


async def test_a_log_sealed_with_another_key_is_not_extended(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    log = await open_log(data_dir)
    await write_records(log, 1, 2)
    await log.close()
    (data_dir / "keys" / "audit-signing.pem").unlink()
    with pytest.raises(AuditKeyError, match="sealed with signing key"):
        await open_log(data_dir)


async def test_verify_store_reports_every_problem_in_order(log_dir: Path) -> None:
    from gateway.app.audit import audit_keys
    from support.audit import settings_for

    with attacker(log_dir) as db:
        _change_body_byte(db)
        db.execute("DELETE FROM audit_record WHERE seq = 9")
    keys = audit_keys(settings_for(log_dir))
    report = await verify_store(log_dir / AUDIT_DB, keys.trusted, keys.signing)
    positions = [p.position for p in report.sorted_problems()]
    assert positions[:2] == [7, 9]
    assert not report.ok


def test_verify_without_an_audit_trail_says_where_it_looked(tmp_path: Path) -> None:
    code, out, err = run_cli("audit", "--data-dir", str(tmp_path / "none"), "verify")
    assert code == 2 and "no audit trail at" in err


async def test_the_gateway_purges_past_retention_at_start(tmp_path: Path) -> None:
    from conftest import start_gateway

    data_dir = tmp_path / "var"
    log = await open_log(data_dir)
    long_ago = datetime.now(UTC) - timedelta(days=10)
    for number in range(1, 5):
        await log.record(ingest_record(number, time=long_ago + timedelta(seconds=number)))
    await log.close()
    gw = await start_gateway(data_dir, **{"audit.retention_days": 1})
    try:
        await eventually(lambda: "purged by retention" in verify(data_dir)[1], timeout=10,
                         what="the purge at start-up")
    finally:
        await gw.runner.cleanup()
    code, out = verify(data_dir)
    assert code == 0 and "records 1..4 purged by retention" in out, out
