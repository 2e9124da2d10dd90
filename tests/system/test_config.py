"""Configuration: defaults, file, environment, flags, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings


def test_defaults_need_no_file() -> None:
    settings = load_settings(None, environ={})
    assert settings.mllp.port == 2575
    assert settings.server.http_port == 8080
    assert settings.store.data_dir == Path("./var")
    assert settings.store.synchronous == "full"
    assert settings.store.dedup_window_days == 7
    assert settings.mllp.max_frame_bytes == 10 * 1024 * 1024


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "isthmus.toml"
    path.write_text('[mllp]\nport = 3000\nidle_timeout = 10\n[server]\nhttp_port = 9000\n')
    settings = load_settings(
        path, environ={"ISTHMUS_MLLP__PORT": "4000", "ISTHMUS_STORE__SYNCHRONOUS": "normal"},
        overrides={"mllp.port": 5000, "server.host": None})
    assert settings.mllp.port == 5000
    assert settings.mllp.idle_timeout == 10
    assert settings.server.http_port == 9000
    assert settings.store.synchronous == "normal"
    assert settings.server.host == "0.0.0.0"


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "isthmus.toml"
    path.write_text('[mllp]\nvalidation = "strict"\n')
    assert load_settings(None, environ={"ISTHMUS_CONFIG": str(path)}).mllp.validation == "strict"


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[mllp]\nport = -1\n", "mllp.port"),
        ("[mllp]\nport = \"many\"\n", "mllp.port"),
        ("[mllp]\nportt = 1\n", "mllp.portt: unknown setting"),
        ("[store]\nsynchronous = \"off\"\n", "store.synchronous"),
        ("[mllp]\ndefault_charset = \"klingon\"\n", "klingon"),
        ("[mllp.tls]\nenabled = true\n", "cert_file and key_file are required"),
        ("[telemetry]\nexporter = \"zipkin\"\n", "telemetry.exporter"),
        ("[mllp]\nmax_buffered_bytes = 2048\n", "at least max_frame_bytes"),
        ("[mllp\n", "isthmus.toml"),
        ('[[backends]]\nname = "ehr"\nkind = "fhir"\nbase_url = "https://ehr.example/r4"\n'
         'aliases = ["https://other.example/r4"]\n', "an alias is a host name"),
        ('[[backends]]\nname = "ehr"\nkind = "fhir"\nbase_url = "https://ehr.example/r4"\n'
         'validation = "fix"\n', "backends.0.validation"),
    ],
)
def test_bad_settings_name_the_key_and_reason(tmp_path: Path, toml: str, needle: str) -> None:
    path = tmp_path / "isthmus.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert needle in str(caught.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_bad_environment_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match="mllp.max_frame_bytes"):
        load_settings(None, environ={"ISTHMUS_MLLP__MAX_FRAME_BYTES": "tiny"})


def test_tls_files_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "isthmus.toml"
    path.write_text(f'[mllp.tls]\nenabled = true\ncert_file = "{tmp_path}/nope.pem"\n'
                    f'key_file = "{tmp_path}/nope.key"\n')
    with pytest.raises(ConfigError, match="cert_file .*nope.pem is not a readable file"):
        load_settings(path, environ={})


@pytest.mark.slow
def test_unusable_tls_material_stops_the_start_cleanly(tmp_path: Path) -> None:
    import subprocess
    import sys

    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    config = tmp_path / "isthmus.toml"
    config.write_text(f'[mllp.tls]\nenabled = true\ncert_file = "{cert}"\nkey_file = "{cert}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), "serve", "--host",
         "127.0.0.1", "--mllp-port", "0", "--http-port", "0", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "certificate or key is unusable" in result.stderr
    assert "isthmus listening" not in result.stdout
