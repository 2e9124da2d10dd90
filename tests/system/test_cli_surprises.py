"""The command line without surprises (issue 19, items 4 and 5): options where users type
them, `send` defaults from the config, one clear line instead of a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MESSAGES, RunningGateway, message, with_control_id
from support.cli import isthmus

ADT = str(MESSAGES / "adt_a01.hl7")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def _one_clear_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- item 4: options where users type them ---------------------------------------------


def test_config_after_the_command_is_read(tmp_path: Path) -> None:
    config = tmp_path / "isthmus.toml"
    config.write_text("[mllp]\nport = 70000\n")
    result = _run("serve", "--config", str(config))
    assert result.returncode == 2
    assert "mllp.port" in _one_clear_line(result)
    assert str(config) in result.stderr


@pytest.mark.parametrize("command", [["inbox", "list"], ["audit", "verify"],
                                     ["outbox", "list"]])
def test_data_dir_after_the_action_is_read(tmp_path: Path, command: list[str]) -> None:
    where = tmp_path / "elsewhere"
    result = _run(*command, "--data-dir", str(where))
    assert result.returncode != 0
    # The message names the directory given after the action, not ./var.
    assert str(where) in _one_clear_line(result)


async def test_inbox_list_and_audit_verify_with_options_after_the_action(
        gateway: RunningGateway) -> None:
    code, out, err = await isthmus("send", "--port", str(gateway.mllp_port), ADT)
    assert code == 0, err
    code, out, err = await isthmus("inbox", "list", "--data-dir", str(gateway.data_dir))
    assert code == 0, err
    assert "CTRL-ADT-0001" in out
    code, out, err = await isthmus("audit", "verify", "--data-dir", str(gateway.data_dir))
    assert code == 0, err


async def test_send_takes_its_port_from_the_environment(gateway: RunningGateway) -> None:
    code, out, err = await isthmus("send", ADT,
                                   env={"ISTHMUS_MLLP__PORT": str(gateway.mllp_port)})
    assert code == 0, err
    assert out.splitlines() == ["CTRL-ADT-0001 AA"]


async def test_send_takes_its_port_from_the_config_file(gateway: RunningGateway,
                                                        tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    config.write_text(f'[send]\nhost = "127.0.0.1"\nport = {gateway.mllp_port}\n')
    code, out, err = await isthmus("send", "--config", str(config), ADT)
    assert code == 0, err
    assert out.splitlines() == ["CTRL-ADT-0001 AA"]


# -- item 5: one clear line, never a traceback -------------------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--tls-ca", "missing.pem"], "--tls-ca"),
    (["--tls", "--tls-cert", "missing.pem"], "--tls-cert"),
    (["--tls", "--tls-key", "k.pem"], "--tls-key"),
    (["--timeout", "-1"], "send.timeout"),
])
def test_send_refuses_unusable_flags_in_one_line(tmp_path: Path, flags: list[str],
                                                 expected: str) -> None:
    result = _run("send", ADT, *[str(tmp_path / f) if f.endswith(".pem") else f
                                 for f in flags])
    assert result.returncode == 2
    assert expected in _one_clear_line(result)


def test_config_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    result = _run("--config", str(tmp_path), "inbox", "list")
    assert result.returncode == 2
    assert "is a directory" in _one_clear_line(result)


def test_a_bad_environment_override_names_the_variable() -> None:
    result = _run("inbox", "list", env={"ISTHMUS_MLLP__PORT": "not-a-port"})
    assert result.returncode == 2
    line = _one_clear_line(result)
    assert "ISTHMUS_MLLP__PORT" in line and "defaults" not in line


async def test_send_with_tls_to_a_plain_port_says_why(gateway: RunningGateway) -> None:
    code, _, err = await isthmus("send", "--tls", "--port", str(gateway.mllp_port),
                                 "--timeout", "5", ADT)
    assert code == 1
    assert "Traceback" not in err
    reason = err.strip().split(f"{gateway.mllp_port}:", 1)[1].strip()
    assert reason, err  # never `cannot connect …:` with nothing after it
    assert "TLS" in reason


async def test_send_timeout_names_the_wait() -> None:
    import asyncio

    async def silent_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    # A TLS client to a server that never completes the handshake: the connect times out.
    server = await asyncio.start_server(silent_accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        code, _, err = await isthmus("send", "--tls", "--port", str(port), "--timeout", "0.5",
                                     ADT)
    finally:
        server.close()
    assert code == 1
    assert "no answer to the TLS handshake within 0.5 s" in err


# -- item 6 (first part): the ACK's ERR segments on request ----------------------------


async def test_send_verbose_prints_the_err_segments(gateway: RunningGateway,
                                                    tmp_path: Path) -> None:
    bad = with_control_id(message("adt_a01.hl7"), "BAD-1").replace(b"|2.5.1|", b"|9.9|")
    path = tmp_path / "bad.hl7"
    path.write_bytes(bad)
    code, out, _ = await isthmus("send", "-v", "--port", str(gateway.mllp_port), str(path))
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "BAD-1 AR"
    assert any(line.startswith("  ERR|") for line in lines[1:]), out
    code, out, _ = await isthmus("send", "--port", str(gateway.mllp_port), str(path))
    assert out.splitlines() == ["BAD-1 AR"]  # without -v, the one line only


# -- item 6 (second part): refusals are remembered without their content ------------------


async def test_refused_messages_are_listed_without_their_content(
        gateway: RunningGateway, tmp_path: Path) -> None:
    from conftest import MllpPeer, segments

    canary = message("canary_adt_a01.hl7")
    wrong_version = with_control_id(canary, "REF-VERSION").replace(b"|2.5.1|", b"|9.9|")
    bad_date = with_control_id(message("adt_a01.hl7"), "REF-DATE")
    peer = await MllpPeer.open(gateway.mllp_port)
    try:
        # The canary asks for enhanced mode (MSH-15 AL): its refusal is a commit reject.
        assert segments(await peer.request(wrong_version))["MSA"][0][1] == "CR"
        assert segments(await peer.request(b"not an HL7 message at all"))["MSA"][0][1] == "AR"
        assert segments(await peer.request(bad_date))["MSA"][0][1] == "AA"
    finally:
        await peer.close()
    await gateway.runner.cleanup()  # flushes the refusal records, as a SIGTERM would
    code, out, err = await isthmus("inbox", "list", "--status", "refused",
                                   "--data-dir", str(gateway.data_dir))
    assert code == 0, err
    header, *rows = out.splitlines()
    assert "CONTROL ID" in header and "ERRORS" in header
    assert len(rows) == 2  # the accepted message is not a refusal
    newest, oldest = rows
    assert "REF-VERSION" in oldest and " CR " in oldest and "@MSH-12" in oldest
    assert " AR " in newest
    for phi in ("QZXCANARYFAM", "WQVCANARYGIV", "MRNCANARY77123", "9.9"):
        assert phi not in out
    raw = (gateway.data_dir / "refusals.db").read_bytes()
    assert b"QZXCANARYFAM" not in raw and b"MRNCANARY77123" not in raw
