"""[store] for PostgreSQL: what a bad setting is told, how TLS is asked for, and that
the password in store.url never reaches an operator's screen or a log."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.app.specs import pg_spec
from gateway.config import StoreConfig, load_settings
from gateway.store.pg.connect import redact_url, tls_context
from support.audit import run_cli
from support.pki import Pki


@pytest.mark.parametrize(("values", "says"), [
    ({"backend": "postgresql"}, "needs store.url"),
    ({"backend": "postgresql", "url": "mysql://db/x"}, "needs store.url"),
    ({"backend": "postgresql", "url": "postgresql://u@h/db", "sslmode": "verify-full"},
     "needs store.sslrootcert"),
    ({"sslmode": "sometimes"}, "sslmode"),
    ({"pool_min_size": 5, "pool_max_size": 2}, "pool_min_size is larger"),
    ({"sslcert": __file__}, "go together"),
    ({"sslrootcert": "/nonexistent/ca.pem"}, "is not a readable file"),
    ({"schema": "Robert'); DROP TABLE"}, "schema"),
])
def test_a_bad_store_setting_is_named(values: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        StoreConfig.model_validate(values)


def test_the_environment_gives_the_url_and_the_spec_follows_the_settings(
        tmp_path: Path) -> None:
    settings = load_settings(None, environ={
        "ISTHMUS_STORE__BACKEND": "postgresql",
        "ISTHMUS_STORE__URL": "postgresql://isthmus:s3cret@db.internal:5432/isthmus",
        "ISTHMUS_STORE__SCHEMA": "site_a", "ISTHMUS_STORE__POOL_MAX_SIZE": "20"})
    spec = pg_spec(settings)
    assert (spec.schema, spec.pool_max_size, spec.ssl) == ("site_a", 20, "prefer")
    assert spec.where == "postgresql://isthmus@db.internal:5432/isthmus"
    assert "s3cret" not in repr(settings.store)


def test_tls_modes_become_what_asyncpg_takes(pki: Pki) -> None:
    assert tls_context("disable", None, None, None) == "disable"
    assert tls_context("prefer", None, None, None) == "prefer"
    required = tls_context("require", None, None, None)
    assert isinstance(required, ssl.SSLContext) and required.verify_mode == ssl.CERT_NONE
    ca_only = tls_context("verify-ca", str(pki.ca), None, None)
    assert isinstance(ca_only, ssl.SSLContext)
    assert ca_only.verify_mode == ssl.CERT_REQUIRED and not ca_only.check_hostname
    full = tls_context("verify-full", str(pki.ca), str(pki.lab_cert), str(pki.lab_key))
    assert isinstance(full, ssl.SSLContext) and full.check_hostname
    # A client certificate with prefer: a context (asyncpg sends it only so).
    assert isinstance(tls_context("prefer", None, str(pki.lab_cert), str(pki.lab_key)),
                      ssl.SSLContext)


def test_the_password_in_the_url_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    assert redact_url("postgresql://u:hunter2@h:1/db") == "postgresql://u@h:1/db"
    monkeypatch.setenv("ISTHMUS_STORE__BACKEND", "postgresql")
    monkeypatch.setenv("ISTHMUS_STORE__URL", "postgresql://u:hunter2@127.0.0.1:1/db")
    code, out, err = run_cli("store", "status")
    assert code == 1 and err.startswith("isthmus store status: cannot connect to "
                                        "postgresql://u@127.0.0.1:1/db")
    assert "hunter2" not in out + err
