"""Audit keys: generated owner-only on a first zero-config start (one warning), read from
files or the environment, rotated without losing old records, refused clearly when bad."""

from __future__ import annotations

import base64
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from conftest import MllpPeer, message, start_gateway, with_control_id
from gateway.app.audit import audit_keys
from gateway.audit.keys import AuditKeyError, parse_data_keys
from gateway.audit.sealed import parse_body
from gateway.config import ConfigError, load_settings
from support.audit import (
    AUDIT_DB,
    CANARY_MRN,
    ingest_record,
    open_log,
    run_cli,
    settings_for,
    write_records,
)

PERIOD = ("--from", "2000-01-01", "--to", "2100-01-01")


async def test_zero_config_generates_owner_only_keys_once_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    data_dir = tmp_path / "var"
    for _ in range(2):
        gw = await start_gateway(data_dir)
        peer = await MllpPeer.open(gw.mllp_port)
        await peer.request(message("adt_a01.hl7"))
        await peer.close()
        await gw.runner.cleanup()
    warnings = [r for r in caplog.records if "audit keys" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    keys = data_dir / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for name in ("audit-data.keys", "audit-signing.pem"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
    assert (keys / "audit-signing.pub.pem").read_text().startswith("-----BEGIN PUBLIC KEY")
    assert run_cli("audit", "--data-dir", str(data_dir), "verify")[0] == 0


async def test_rotation_new_key_encrypts_old_records_still_decrypt_and_verify(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    log = await open_log(data_dir)
    await write_records(log, 1, 3, patient=f"SYNTHHOSP|{CANARY_MRN}")
    await log.close()
    code, line, _ = run_cli("audit", "new-key")
    assert code == 0
    key_file = data_dir / "keys" / "audit-data.keys"
    with key_file.open("a") as fh:
        fh.write(line)
    new_id = line.split()[0]
    log = await open_log(data_dir)
    assert log.keys.ring is not None and log.keys.ring.current.id == new_id
    await write_records(log, 4, 5, patient=f"SYNTHHOSP|{CANARY_MRN}")
    await log.close()
    code, out, err = run_cli("audit", "--data-dir", str(data_dir), "export", *PERIOD,
                             "--patient", CANARY_MRN, "--action", "ingest",
                             "--format", "ndjson", "--decrypt")
    assert code == 0, err
    exported = [orjson.loads(x) for x in out.splitlines()][:-1]
    assert len(exported) == 5  # found under both keys' blind indexes
    sealed_with = [parse_body(base64.b64decode(e["extension"][0]["extension"][2][
        "valueBase64Binary"]))["phi"]["key"] for e in exported]
    assert sealed_with[:3] == [sealed_with[0]] * 3 and sealed_with[3:] == [new_id] * 2
    for event in exported:
        patient = next(x for x in event["entity"] if x["role"]["code"] == "1")
        assert patient["what"]["identifier"]["value"] == CANARY_MRN
    assert run_cli("audit", "--data-dir", str(data_dir), "verify")[0] == 0


async def test_records_whose_key_is_gone_export_encrypted_and_say_so(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    log = await open_log(data_dir)
    await write_records(log, 1, 2)
    await log.close()
    key_file = data_dir / "keys" / "audit-data.keys"
    key_file.write_text(run_cli("audit", "new-key")[1])  # the old key removed (a mistake)
    code, out, err = run_cli("audit", "--data-dir", str(data_dir), "export", *PERIOD,
                             "--format", "ndjson", "--decrypt")
    assert code == 0
    assert "2 records could not be decrypted" in err
    assert "patient-pseudonym" in out


async def test_keys_from_the_environment(tmp_path: Path) -> None:
    data_key = run_cli("audit", "new-key")[1].strip().replace(" ", ":")
    signing = base64.b64encode(os.urandom(32)).decode()
    env = {"ISTHMUS_AUDIT__KEYS": data_key, "ISTHMUS_AUDIT__SIGNING_KEY": signing}
    settings = load_settings(None, environ=env, overrides={"store.data_dir": tmp_path})
    keys = audit_keys(settings, create=True)
    assert keys.ring is not None and keys.ring.current.id == data_key.split(":")[0]
    assert not (tmp_path / "keys").exists()  # nothing generated: the environment has them
    assert "SecretStr" in repr(settings.audit.keys) and data_key not in repr(settings)


async def test_the_gateway_runs_on_keys_given_by_file(tmp_path: Path) -> None:
    keys = tmp_path / "secrets"
    keys.mkdir()
    (keys / "data.keys").write_text(run_cli("audit", "new-key")[1])
    (keys / "data.keys").chmod(0o600)
    generated = settings_for(tmp_path / "elsewhere")
    audit_keys(generated, create=True)
    (tmp_path / "elsewhere" / "keys" / "audit-signing.pem").rename(keys / "signing.pem")
    (keys / "store.keys").write_text(run_cli("store", "new-key")[1])
    (keys / "store.keys").chmod(0o600)
    gw = await start_gateway(tmp_path / "var", **{
        "audit.key_file": keys / "data.keys", "audit.signing_key_file": keys / "signing.pem",
        "encryption.key_file": keys / "store.keys"})
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        await peer.request(with_control_id(message("adt_a01.hl7"), "FILEKEYS"))
        await peer.close()
    finally:
        await gw.runner.cleanup()
    assert not (tmp_path / "var" / "keys").exists()
    assert (tmp_path / "var" / AUDIT_DB).exists()


@pytest.mark.parametrize(("text", "message"), [
    ("k1 not-base64!", "key 'k1' is not valid base64"),
    ("k1 " + base64.b64encode(b"short").decode(), "is not 32 bytes"),
    ("bad/id " + base64.b64encode(os.urandom(32)).decode(), "may hold only letters"),
    ("# only a comment\n", "holds no audit data keys"),
    ("lonely", "entry 1 is not '<key id> <base64 key>'"),
])
def test_malformed_data_keys_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(AuditKeyError, match=message) as caught:
        parse_data_keys(text, "audit.keys")
    assert "not-base64!" not in str(caught.value) or "k1" in str(caught.value)


def test_two_keys_with_one_id_are_refused() -> None:
    secret = base64.b64encode(os.urandom(32)).decode()
    from gateway.audit.keys import KeyRing

    with pytest.raises(AuditKeyError, match="unique"):
        KeyRing(tuple(parse_data_keys(f"k1:{secret},k1:{secret}", "audit.keys")))


def test_a_configured_key_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="audit.key_file"):
        load_settings(None, environ={}, overrides={"audit.key_file": tmp_path / "nope"})


def test_a_key_file_others_can_read_is_warned_about(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "data.keys"
    path.write_text(run_cli("audit", "new-key")[1])
    path.chmod(0o644)
    from gateway.audit.keys import read_data_key_file

    read_data_key_file(path)
    assert "readable by group or others" in caplog.text


@pytest.mark.slow
def test_serve_with_an_unusable_signing_key_stops_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "signing.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--mllp-port", "0",
         "--http-port", "0", "--data-dir", str(tmp_path / "var")],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "ISTHMUS_AUDIT__SIGNING_KEY_FILE": str(bad)})
    assert result.returncode == 1
    assert "the audit trail cannot be opened" in result.stderr
    assert "not an Ed25519 private key" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


async def test_records_keep_their_time_when_given(tmp_path: Path) -> None:
    log = await open_log(tmp_path / "var")
    seq = await log.record(ingest_record(1))
    await log.close()
    assert seq == 1
