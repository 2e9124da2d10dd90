"""`isthmus outbox list|show|retry|drop`: what an operator sees (never PHI) and does."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import message
from gateway.cli import main
from gateway.store.inbox import InboundMessage
from gateway.store.inbox_sqlite import SqliteInbox
from gateway.store.outbox import SqliteOutbox

CANARY = message("canary_adt_a01.hl7")
CANARIES = ("QZXCANARYFAM", "WQVCANARYGIV", "MRNCANARY77123", "19110317", "1911-03-17",
            "Qzxcanary", "Vqwcanaryville", "0173344", "qzx.canary")
PATIENT_KEY = hashlib.sha256(b"MRNCANARY77123").hexdigest()


def canary_message(control_id: str, routes: tuple[str, ...]) -> InboundMessage:
    return InboundMessage(
        sending_application="SYNTHADT", sending_facility="SYNTHHOSP", control_id=control_id,
        message_type="ADT^A01", version="2.5.1", peer="127.0.0.1", raw=CANARY, ack=b"ACK",
        received_at=datetime.now(UTC), status="routed", routes=routes,
        patient_key=PATIENT_KEY, bundle=b'{"name": [{"family": "QZXCANARYFAM"}]}')


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An inbox with four deliveries: 1 legacy waiting to retry, 2 ehr dead, 3 legacy
    delivered, 4 ehr pending."""

    async def setup() -> None:
        inbox = await SqliteInbox.open(tmp_path / "inbox.db", synchronous="normal")
        try:
            await inbox.accept(canary_message("CANARY-A01-0001", ("legacy", "ehr")))
            await inbox.accept(canary_message("CANARY-A01-0002", ("legacy", "ehr")))
            outbox = SqliteOutbox(inbox.connection)
            await outbox.reschedule(1, 2, time.time() + 600, "ACK AR", "ACK AR")
            await outbox.dead(2, 1, "HTTP 422", "HTTP 422 (invalid resource)")
            await outbox.mark_delivered([(3, "ACK AA")])
        finally:
            await inbox.close()

    asyncio.run(setup())
    return tmp_path


def run(data_dir: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["outbox", "--data-dir", str(data_dir), *args])
    out, err = capsys.readouterr()
    return code, out + err


def no_phi(text: str) -> None:
    found = [c for c in (*CANARIES, PATIENT_KEY) if c.lower() in text.lower()]
    assert not found, f"PHI in the output: {found}"


def statuses(data_dir: Path) -> dict[int, str]:
    async def read() -> dict[int, str]:
        inbox = await SqliteInbox.open(data_dir / "inbox.db", synchronous="normal")
        try:
            rows = await inbox.connection.execute_fetchall("SELECT id, status FROM outbox")
            return {int(i): str(s) for i, s in rows}
        finally:
            await inbox.close()

    return asyncio.run(read())


def test_list_shows_the_deliveries_and_no_phi(data_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(data_dir, "list", capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "INBOX", "BACKEND", "STATUS"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["4", "2", "ehr", "pending"], ["3", "2", "legacy", "delivered"],
        ["2", "1", "ehr", "dead"], ["1", "1", "legacy", "pending"]]
    assert "CANARY-A01-0001" in out and "ADT^A01" in out and "HTTP 422 (invalid" in out
    no_phi(out)

    code, out = run(data_dir, "list", "--status", "dead", capsys=capsys)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["2"]
    code, out = run(data_dir, "list", "--backend", "legacy", "--limit", "1", capsys=capsys)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["3"]


def test_show_gives_statuses_and_times_but_not_the_message(
        data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(data_dir, "show", "1", capsys=capsys)
    assert code == 0
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    assert fields["status"] == "pending" and fields["attempts"] == "2"
    assert fields["sent as"] == "ISM00000000000000001"
    assert fields["control id"] == "CANARY-A01-0001"
    assert fields["last status"] == "ACK AR"
    assert fields["next attempt"].endswith("Z") and fields["created"].endswith("Z")
    no_phi(out)
    assert "MSH" not in out and "PID" not in out

    # Row 4 is the same patient's next message for the ehr backend: it waits behind the
    # dead row 2, which says so.
    code, out = run(data_dir, "show", "4", capsys=capsys)
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    assert fields["next attempt"] == "after delivery 2 (dead; isthmus outbox retry|drop 2)"
    assert "holds" not in fields
    code, out = run(data_dir, "show", "2", capsys=capsys)
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    assert fields["status"] == "dead" and fields["holds"] == "1 later deliveries of its patient"
    no_phi(out)

    code, out = run(data_dir, "show", "99", capsys=capsys)
    assert code == 1 and "no delivery with id 99" in out


def test_retry_and_drop_change_the_status(data_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(data_dir, "retry", "2", capsys=capsys)
    assert (code, out.strip()) == (0, "1 deliveries set to pending")
    assert statuses(data_dir)[2] == "pending"
    # Nothing dead left to retry: exit 1.
    assert run(data_dir, "retry", "2", capsys=capsys)[0] == 1
    assert run(data_dir, "retry", "--all-dead", capsys=capsys)[0] == 1

    code, out = run(data_dir, "drop", "2", "4", "3", capsys=capsys)
    assert (code, out.strip()) == (0, "2 deliveries dropped")  # a delivered row stays so
    assert statuses(data_dir) == {1: "pending", 2: "dropped", 3: "delivered", 4: "dropped"}
    assert run(data_dir, "drop", "3", capsys=capsys)[0] == 1

    code, _ = run(data_dir, "retry", "4", capsys=capsys)  # a dropped row comes back
    assert code == 0 and statuses(data_dir)[4] == "pending"


def test_retry_all_dead_for_one_backend(data_dir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert run(data_dir, "retry", "--all-dead", "--backend", "legacy", capsys=capsys)[0] == 1
    code, out = run(data_dir, "retry", "--all-dead", "--backend", "ehr", capsys=capsys)
    assert (code, out.strip()) == (0, "1 deliveries set to pending")
    assert statuses(data_dir)[2] == "pending"


def test_usage_errors_exit_2(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(data_dir, "retry", capsys=capsys)[0] == 2
    assert run(data_dir, "retry", "1", "--all-dead", capsys=capsys)[0] == 2
    with pytest.raises(SystemExit) as exited:
        main(["outbox", "--data-dir", str(data_dir), "drop"])
    assert exited.value.code == 2
    assert main(["outbox", "--data-dir", str(data_dir / "nowhere"), "list"]) == 2


@pytest.mark.slow
def test_the_installed_command(data_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "outbox", "--data-dir", str(data_dir), "list",
         "--status", "pending"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["4", "1"]
    no_phi(result.stdout + result.stderr)
