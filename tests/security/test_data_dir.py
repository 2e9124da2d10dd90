"""Issue 13, items 9 and 11: the data directory holds PHI, so it and every file in it are
the owner's alone, a start-up refuses a directory other users can open, and one data
directory serves one `isthmus serve` at a time (an exclusive lock that dies with the
process, so a kill -9 leaves nothing to clean up)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GatewayProcess, MllpPeer, message, start_gateway, with_control_id


def _modes(data_dir: Path) -> dict[str, int]:
    """Every directory and file under the data dir (itself included) with its mode bits."""
    found = {".": stat.S_IMODE(data_dir.stat().st_mode)}
    for root, dirs, files in os.walk(data_dir):
        for name in [*dirs, *files]:
            path = Path(root, name)
            found[str(path.relative_to(data_dir))] = stat.S_IMODE(path.stat().st_mode)
    return found


def _open_to_others(modes: dict[str, int], data_dir: Path) -> dict[str, str]:
    return {name: oct(mode) for name, mode in modes.items()
            if mode & 0o077 or (name != "." and (data_dir / name).is_dir() and mode != 0o700)}


def _serve(data_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--mllp-port", "0",
         "--http-port", "0", "--data-dir", str(data_dir), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _refused(proc: subprocess.Popen[str], timeout: float = 30.0) -> tuple[int, str, str]:
    """The exit code, stdout and stderr of a serve that should stop by itself (killed and
    reported as a start if it does not)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        return -1, out, err
    return proc.returncode, out, err


async def test_a_new_data_dir_and_every_file_in_it_are_owner_only(tmp_path: Path) -> None:
    # In-process, under the test runner's umask (022): the modes are explicit, not luck.
    old = os.umask(0o022)
    try:
        gw = await start_gateway(tmp_path / "var")
        try:
            peer = await MllpPeer.open(gw.mllp_port)
            await peer.request(with_control_id(message("adt_a01.hl7"), "MODES-1"))
            await peer.close()
            modes = _modes(gw.data_dir)
        finally:
            await gw.runner.cleanup()
    finally:
        os.umask(old)
    # The stores, their WAL and SHM files, the keys and the lock were all there.
    assert {"inbox.db", "fhir.db", "audit.db", "inbox.db-wal", "keys"} <= set(modes), modes
    assert modes["."] == 0o700, oct(modes["."])
    assert _open_to_others(modes, gw.data_dir) == {}


def test_serve_creates_owner_only_files_whatever_the_callers_umask(tmp_path: Path) -> None:
    process = GatewayProcess(tmp_path / "var")
    old = os.umask(0o002)  # a permissive site umask, inherited by the child
    try:
        process.start()
    finally:
        os.umask(old)
    try:
        modes = _modes(process.data_dir)
    finally:
        assert process.terminate() == 0
    assert modes["."] == 0o700 and _open_to_others(modes, process.data_dir) == {}, modes


@pytest.mark.parametrize("opened", [".", "keys"])
def test_serve_refuses_a_data_dir_other_users_can_open(tmp_path: Path, opened: str) -> None:
    data_dir = tmp_path / "var"
    process = GatewayProcess(data_dir).start()  # a store as the gateway leaves it
    assert process.terminate() == 0
    (data_dir / opened).chmod(0o755)  # what the gateway created before the fix
    code, out, err = _refused(_serve(data_dir))
    assert code == 1, (code, err)
    assert "isthmus listening" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "other users" in lines[0] and "chmod" in lines[0], lines[0]


async def test_a_wide_file_in_an_owner_only_data_dir_is_named_in_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "var"
    gw = await start_gateway(data_dir)
    await gw.runner.cleanup()
    (data_dir / "inbox.db").chmod(0o644)  # unreadable by others while var/ is 0700
    gw = await start_gateway(data_dir)
    await gw.runner.cleanup()
    warned = [r.getMessage() for r in caplog.records if r.name == "gateway.store.data_dir"]
    assert len(warned) == 1 and "inbox.db (0644)" in warned[0] and "chmod" in warned[0]


async def test_allow_group_read_accepts_a_group_readable_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    gw = await start_gateway(data_dir)
    await gw.runner.cleanup()
    for path in [data_dir, *data_dir.rglob("*")]:
        path.chmod(0o750 if path.is_dir() else 0o640)
    gw = await start_gateway(data_dir, **{"store.allow_group_read": True})
    await gw.runner.cleanup()
    data_dir.chmod(0o755)  # open to everyone: still refused
    with pytest.raises(Exception, match="other users"):
        gw = await start_gateway(data_dir, **{"store.allow_group_read": True})


def test_a_second_serve_on_the_same_data_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    first = GatewayProcess(tmp_path / "var").start()
    try:
        code, out, err = _refused(_serve(first.data_dir))
        assert code == 1, (code, err)
        assert "isthmus listening" not in out
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert "in use by another isthmus" in lines[0], lines[0]
        # The first one never noticed.
        assert first.proc is not None and first.proc.poll() is None
    finally:
        assert first.terminate() == 0


def test_after_a_sigkill_the_next_serve_starts(tmp_path: Path) -> None:
    first = GatewayProcess(tmp_path / "var").start()
    assert first.proc is not None
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    second = GatewayProcess(tmp_path / "var").start()  # the lock died with the process
    try:
        assert second.listening_line
    finally:
        assert second.terminate() == 0
