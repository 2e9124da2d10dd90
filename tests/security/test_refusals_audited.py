"""Issue 13 item 6: refused FHIR requests (401, 403) are in the audit trail, without the
ids they probed; the token endpoint answers a locked audit store with a quick OAuth 503.

A real gateway on 127.0.0.1 with its audit log on a real SQLite file; the lock is a
second connection holding a write transaction on audit.db.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from conftest import RunningGateway, start_gateway
from gateway.audit.query import AuditQuery
from gateway.audit.sealed import parse_body, reveal
from gateway.edge.audit_http import AUDIT
from gateway.edge.auth_server import JWT_BEARER
from support.audit import AUDIT_DB

ISSUER = "https://gw.example"
API_KEY = "slot-reader-key-0123"
PROBED_ID = "probe-target-4711"  # an id a BOLA probe would try: never in the record


@pytest.fixture(scope="module")
def client_key() -> ECKey:
    return ECKey.generate_key("P-384")


@pytest.fixture
async def gw(tmp_path: Path, client_key: ECKey) -> AsyncIterator[RunningGateway]:
    key = client_key
    pem = tmp_path / "client.pem"
    pem.write_bytes(key.as_pem(private=False))
    running = await start_gateway(tmp_path / "var", **{
        "auth.issuer": ISSUER,
        "auth.clients": [{"client_id": "pem-client", "public_key_file": str(pem),
                          "scopes": ["system/*.rs"]}],
        "auth.api_keys": [{"name": "slot-reader", "scopes": ["system/Slot.rs"],
                           "key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]})
    try:
        yield running
    finally:
        await running.runner.cleanup()


async def get(gw: RunningGateway, path: str, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as session, session.get(
            f"{gw.http_url}{path}", headers=headers or {},
            timeout=aiohttp.ClientTimeout(total=20)) as response:
        await response.read()
        return response.status


async def records(gw: RunningGateway) -> list[dict[str, Any]]:
    audit = gw.app[AUDIT]
    out = []
    for row in await audit.search(AuditQuery(), limit=1000):
        body = parse_body(row.body)
        revealed = reveal(body, audit.keys.ring)
        body["revealed"] = revealed
        out.append(body)
    return out


async def test_refused_fhir_requests_are_on_record(gw: RunningGateway) -> None:
    # 401: no credential, then a forged one; 403: a valid key without a Patient scope.
    assert await get(gw, f"/fhir/Patient/{PROBED_ID}") == 401
    assert await get(gw, "/fhir/Patient", {"Authorization": "Bearer not.a.token"}) == 401
    assert await get(gw, f"/fhir/Patient/{PROBED_ID}", {"X-API-Key": API_KEY}) == 403
    assert await get(gw, f"/fhir/Observation?subject=Patient/{PROBED_ID}",
                     {"X-API-Key": API_KEY}) == 403
    refused = [r for r in await records(gw) if r.get("outcome") in ("401", "403")]
    summary = [(r.get("action"), r.get("outcome"), r.get("client", ""), r.get("type", ""))
               for r in refused]
    assert summary == [("read", "401", "", "Patient"), ("search", "401", "", "Patient"),
                       ("read", "403", "slot-reader", "Patient"),
                       ("search", "403", "slot-reader", "Observation")], summary
    assert all(r.get("peer") for r in refused)
    # No PHI: neither the probed id nor the query, sealed or not.
    for record in refused:
        assert PROBED_ID not in repr(record)
        assert record["revealed"] is None or not any(
            PROBED_ID in str(v) for v in record["revealed"])


def _assertion(key: ECKey) -> str:
    now = int(time.time())
    claims = {"iss": "pem-client", "sub": "pem-client", "aud": f"{ISSUER}/auth/token",
              "iat": now, "exp": now + 240, "jti": uuid.uuid4().hex}
    return jwt.encode({"alg": "ES384", "kid": "k"}, claims, key, algorithms=["ES384"])


async def test_token_endpoint_answers_503_quickly_when_the_audit_store_is_locked(
        gw: RunningGateway, client_key: ECKey) -> None:
    form = {"grant_type": "client_credentials", "client_assertion_type": JWT_BEARER,
            "client_assertion": _assertion(client_key), "scope": "system/Patient.rs"}
    locker = sqlite3.connect(gw.data_dir / AUDIT_DB, timeout=1, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
        started = time.monotonic()
        async with aiohttp.ClientSession() as session, session.post(
                f"{gw.http_url}/auth/token", data=form,
                timeout=aiohttp.ClientTimeout(total=30)) as response:
            elapsed = time.monotonic() - started
            body = await response.json(content_type=None)
            assert response.status == 503, body
            assert response.content_type == "application/json"
            assert body["error"] == "temporarily_unavailable"
            assert int(response.headers["Retry-After"]) > 0
            assert response.headers["Cache-Control"] == "no-store"
            assert "access_token" not in body
        assert elapsed < 4.0, elapsed
    finally:
        locker.execute("ROLLBACK")
        locker.close()
