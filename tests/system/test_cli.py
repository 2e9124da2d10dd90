"""The command line as operators use it: serve, send, inbox, configuration."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import MESSAGES, GatewayProcess, RunningGateway, message, with_control_id
from support.cli import isthmus

# -- serve ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_serve_prints_exactly_one_listening_line_and_stops_on_sigterm(
        gateway_process: GatewayProcess) -> None:
    gateway_process.start()
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{gateway_process.http_port}"
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{base}/readyz") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ready"
    started = time.monotonic()
    assert gateway_process.terminate(timeout=15) == 0
    assert time.monotonic() - started < 10
    # Nothing else on stdout: tools read the one line.
    assert gateway_process.remaining_stdout() == ""
    assert (gateway_process.data_dir / "inbox.db").exists()


@pytest.mark.slow
def test_serve_sigint_also_exits_cleanly(gateway_process: GatewayProcess) -> None:
    gateway_process.start()
    assert gateway_process.proc is not None
    gateway_process.proc.send_signal(signal.SIGINT)
    assert gateway_process.proc.wait(15) == 0


@pytest.mark.slow
def test_serve_refuses_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "isthmus.toml"
    config.write_text('[mllp]\nport = 70000\n[store]\nsynchronous = "sometimes"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), "serve"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "mllp.port" in result.stderr and "65535" in result.stderr
    assert "store.synchronous" in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
             "--mllp-port", str(port), "--http-port", "0", "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "isthmus listening" not in result.stdout


@pytest.mark.slow
def test_environment_overrides_config_file(tmp_path: Path) -> None:
    config = tmp_path / "isthmus.toml"
    config.write_text(f'[store]\ndata_dir = "{tmp_path / "from-file"}"\n')
    process = GatewayProcess(tmp_path / "ignored", env={
        "ISTHMUS_CONFIG": str(config),
        "ISTHMUS_MLLP__IDLE_TIMEOUT": "0.5",
    })
    # --data-dir on the command line beats both the file and the environment.
    process.start()
    try:
        with socket.create_connection(("127.0.0.1", process.mllp_port)) as idle:
            idle.settimeout(10)
            assert idle.recv(1) == b""  # closed by the 0.5 s idle timeout from the env
    finally:
        assert process.terminate() == 0
    assert (tmp_path / "ignored" / "inbox.db").exists()
    assert not (tmp_path / "from-file").exists()


# -- send -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_send_prints_each_control_id_with_its_ack(gateway: RunningGateway,
                                                        tmp_path: Path) -> None:
    code, out, err = await isthmus("send", "--port", str(gateway.mllp_port),
                                   str(MESSAGES / "adt_a01.hl7"))
    assert code == 0, err
    assert out.splitlines() == ["CTRL-ADT-0001 AA"]


@pytest.mark.slow
async def test_send_unwraps_a_batch_file(gateway: RunningGateway, tmp_path: Path) -> None:
    batch = (b"FHS|^~\\&|SYNTHLAB\rBHS|^~\\&|SYNTHLAB\r"
             + with_control_id(message("adt_a01.hl7"), "BATCH-1")
             + with_control_id(message("adt_a01.hl7"), "BATCH-2")
             + b"BTS|2\rFTS|1\r")
    path = tmp_path / "batch.hl7"
    path.write_bytes(batch)
    code, out, _ = await isthmus("send", "--port", str(gateway.mllp_port), str(path))
    assert code == 0
    assert out.splitlines() == ["BATCH-1 AA", "BATCH-2 AA"]
    assert await gateway.inbox.count() == 2


@pytest.mark.slow
async def test_send_exits_non_zero_on_a_rejection(gateway: RunningGateway,
                                                  tmp_path: Path) -> None:
    path = tmp_path / "two.hl7"
    good = with_control_id(message("adt_a01.hl7"), "GOOD-1")
    bad = good.replace(b"|2.5.1|", b"|9.9|").replace(b"GOOD-1", b"BAD-1")
    path.write_bytes(good + bad)
    code, out, _ = await isthmus("send", "--port", str(gateway.mllp_port), str(path))
    assert code == 1
    assert out.splitlines() == ["GOOD-1 AA", "BAD-1 AR"]


@pytest.mark.slow
async def test_send_reports_a_timeout(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)  # swallow the message, never answer

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        code, out, _ = await isthmus("send", "--port", str(port), "--timeout", "0.5",
                                     str(MESSAGES / "adt_a01.hl7"))
    finally:
        server.close()
    assert code == 1
    assert out.splitlines() == ["CTRL-ADT-0001 timeout"]


@pytest.mark.slow
async def test_send_to_nothing_listening_fails_clearly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = await isthmus("send", "--port", str(port), str(MESSAGES / "adt_a01.hl7"))
    assert code == 1
    assert "cannot connect" in err


@pytest.mark.slow
async def test_send_missing_file_fails_clearly(tmp_path: Path) -> None:
    code, _, err = await isthmus("send", str(tmp_path / "nope.hl7"))
    assert code == 2
    assert "nope.hl7" in err


# -- inbox ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_inbox_list_shows_no_phi_and_show_gives_the_message(
        gateway: RunningGateway) -> None:
    code, out, err = await isthmus("send", "--port", str(gateway.mllp_port),
                                   str(MESSAGES / "adt_a01.hl7"))
    assert code == 0, err
    data_dir = str(gateway.data_dir)
    code, listing, err = await isthmus("inbox", "--data-dir", data_dir, "list")
    assert code == 0, err
    assert "CTRL-ADT-0001" in listing and "ADT^A01" in listing and "applied" in listing
    assert "SYNTHLAB/SYNTHHOSP" in listing
    for phi in ("CANARYFAMILY", "MRN-100001", "19800102", "Example Street"):
        assert phi not in listing
    code, shown, _ = await isthmus("inbox", "--data-dir", data_dir, "show", "1")
    assert code == 0
    assert "CANARYFAMILY^Jane" in shown and "MSA|AA|CTRL-ADT-0001" in shown


@pytest.mark.slow
async def test_inbox_show_unknown_id(gateway: RunningGateway) -> None:
    code, _, err = await isthmus("inbox", "--data-dir", str(gateway.data_dir), "show", "99")
    assert code == 1
    assert "99" in err


@pytest.mark.slow
def test_inbox_without_a_store_says_where_it_looked(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "inbox", "--data-dir", str(tmp_path / "none"),
         "list"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "no inbox" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["inbox"], ["bogus"]])
def test_incomplete_commands_print_help_and_fail(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["corrupt store", "data dir is a file"])
def test_serve_refuses_an_unusable_data_dir_clearly(tmp_path: Path, kind: str) -> None:
    if kind == "corrupt store":
        data_dir = tmp_path / "var"
        data_dir.mkdir(mode=0o700)  # owner-only, or the start refuses it before opening
        (data_dir / "inbox.db").write_bytes(b"this is not an SQLite database " * 8)
        (data_dir / "inbox.db").chmod(0o600)
        expected = "cannot be opened"
    else:
        data_dir = tmp_path / "afile"
        data_dir.write_text("")
        expected = "cannot start"
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--mllp-port", "0",
         "--http-port", "0", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert "isthmus listening" not in result.stdout


async def test_auth_api_key_prints_a_key_and_config_lines_that_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    from conftest import start_gateway
    from gateway.cli import main

    assert main(["auth", "api-key", "tour", "--scope", "system/Patient.rs"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[1]
    config = tomllib.loads("\n".join(out[3:]))
    entry = config["auth"]["api_keys"][0]
    assert entry["name"] == "tour" and key not in "\n".join(out[2:])  # only its hash
    gw = await start_gateway(tmp_path / "var", **{"auth.api_keys": [entry]})
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{gw.http_url}/fhir/Patient",
                                headers={"X-API-Key": key}) as allowed:
                assert allowed.status == 200
            async with http.get(f"{gw.http_url}/fhir/Observation",
                                headers={"X-API-Key": key}) as refused:
                assert refused.status == 403  # only the scope asked for
            async with http.get(f"{gw.http_url}/fhir/Patient",
                                headers={"X-API-Key": key + "x"}) as wrong:
                assert wrong.status == 401
    finally:
        await gw.runner.cleanup()


@pytest.mark.parametrize("args", [["auth", "api-key", "bad name"],
                                  ["auth", "api-key", "x", "--scope", "system/Patient.zz"]])
def test_auth_api_key_refuses_a_bad_name_or_scope(
        args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "isthmus auth api-key:" in captured.err
