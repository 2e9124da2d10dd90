"""What one appended record holds: its time from the system clock when the caller gives
none, and its columns stored with the types readers and `audit verify` expect."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from gateway.audit.record import Action, AuditRecord, now_timestamp, system_clock, timestamp
from support.audit import AUDIT_DB, open_log, run_cli

_FIXED_WIDTH = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def test_now_timestamp_is_the_system_clock_in_the_fixed_width_form() -> None:
    for _ in range(2000):  # crosses no second or some: both paths of the remembered text
        before = timestamp(system_clock())
        now = now_timestamp()
        after = timestamp(system_clock())
        assert _FIXED_WIDTH.fullmatch(now), now
        assert before <= now <= after


async def test_a_record_without_a_time_gets_the_clock_and_typed_columns(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    log = await open_log(data_dir)
    before = timestamp(system_clock())
    await log.record(AuditRecord(Action.READ, client_id="synth-client",
                                 resource_type="Patient", resource_id="Patient/p1",
                                 patient="Patient/p1"))
    after = timestamp(system_clock())
    await log.close()

    db = sqlite3.connect(data_dir / AUDIT_DB)
    row = db.execute(
        "SELECT recorded_at, action, typeof(action), typeof(patient_index), "
        "typeof(patient_id_index), typeof(body), typeof(hash), typeof(mac) "
        "FROM audit_record").fetchone()
    db.close()
    assert before <= row[0] <= after
    assert row[1:] == ("read", "text", "blob", "blob", "blob", "blob", "blob")
    code, out, err = run_cli("audit", "--data-dir", str(data_dir), "verify")
    assert code == 0, out + err
