"""Issue 13 items 4 and 5: our tokens end at their exp, client assertions live at most five
minutes and are used once even across a restart, a PEM-keyed client may name a kid; and
mTLS subjects are RFC 4514 names, compared as names.

Real gateways on 127.0.0.1 (real SQLite files, real TLS sockets); assertions are minted
with joserfc, an independent JOSE implementation.
"""

from __future__ import annotations

import datetime
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import ECKey

from conftest import RunningGateway, message, start_gateway, with_control_id
from gateway.audit.query import AuditQuery
from gateway.audit.sealed import parse_body
from gateway.edge.audit_http import AUDIT
from gateway.edge.auth_server import AUTH_SERVER, JWT_BEARER
from support.pki import Pki, client_context
from support.tls import exchange, mtls, tls_gateway

ISSUER = "https://gw.example"  # fixed, so an assertion's aud survives a restart's new port
TOKEN_URL = f"{ISSUER}/auth/token"
ADT = message("adt_a01.hl7")  # MSH-3 SYNTHLAB, MSH-4 SYNTHHOSP


@dataclass
class Client:
    key: ECKey
    pem: Path

    def assertion(self, client_id: str = "pem-client", kid: str | None = None,
                  **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": now + 240,
                "iat": now, "jti": uuid.uuid4().hex, **claims}
        header = {"alg": "ES384", **({"kid": kid} if kid is not None else {})}
        return jwt.encode(header, {k: v for k, v in body.items() if v is not None}, self.key,
                          algorithms=["ES384"])


@pytest.fixture(scope="module")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Client:
    key = ECKey.generate_key("P-384")
    pem = tmp_path_factory.mktemp("client") / "client.pem"
    pem.write_bytes(key.as_pem(private=False))
    return Client(key, pem)


def auth_overrides(client: Client, *, named_kid: bool = False) -> dict[str, Any]:
    clients: list[dict[str, Any]] = [{"client_id": "pem-client",
                                      "public_key_file": str(client.pem),
                                      "scopes": ["system/*.rs"]}]
    if named_kid:
        clients.append({"client_id": "named-kid", "public_key_file": str(client.pem),
                        "kid": "key-2026", "scopes": ["system/*.rs"]})
    return {"auth.issuer": ISSUER, "auth.clients": clients}


@pytest.fixture
async def gw(tmp_path: Path, client_key: Client) -> AsyncIterator[RunningGateway]:
    running = await start_gateway(tmp_path / "var", **auth_overrides(client_key))
    try:
        yield running
    finally:
        await running.runner.cleanup()


async def token(gw: RunningGateway, assertion: str,
                scope: str = "system/Patient.rs") -> tuple[int, dict[str, Any]]:
    form = {"grant_type": "client_credentials", "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion, "scope": scope}
    async with aiohttp.ClientSession() as session, session.post(
            f"{gw.http_url}/auth/token", data=form,
            timeout=aiohttp.ClientTimeout(total=20)) as response:
        return response.status, await response.json(content_type=None)


async def fhir_get(gw: RunningGateway, path: str,
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(
            f"{gw.http_url}{path}", headers=headers or {},
            timeout=aiohttp.ClientTimeout(total=20)) as response:
        return response.status, await response.json(content_type=None)


# -- item 4: tokens ---------------------------------------------------------------------------


async def test_our_access_token_gets_no_clock_skew_after_its_exp(
        gw: RunningGateway, client_key: Client) -> None:
    status, body = await token(gw, client_key.assertion())
    assert status == 200, body
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    server = gw.app[AUTH_SERVER]
    # Accepted (and cached) while valid; from exp on, refused: the cached entry too.
    assert (await fhir_get(gw, "/fhir/Patient", bearer))[0] == 200
    issued_exp = time.time() + body["expires_in"]
    server.clock = lambda: issued_exp + 1  # one second past exp, well within 30 s of skew
    status, outcome = await fhir_get(gw, "/fhir/Patient", bearer)
    assert status == 401, outcome
    assert outcome["issue"][0]["diagnostics"] == "expired"


@pytest.mark.parametrize(("exp_ahead", "iat_offset", "accepted"), [
    (300, 0, True),       # exactly five minutes after iat = now: SMART's limit
    (301, 0, False),      # iat + 301 s (accepted before: the limit had 30 s of skew on top)
    (310, None, False),   # no iat: measured from our clock
    (250, -100, False),   # only 250 s ahead of us, but 350 s after the iat it states
    (300, 10, True),      # iat 10 s ahead of our clock (skew): a 290 s lifetime
])
async def test_assertion_exp_more_than_five_minutes_after_iat_or_now_is_refused(
        gw: RunningGateway, client_key: Client, exp_ahead: int, iat_offset: int | None,
        accepted: bool) -> None:
    now = int(time.time())
    status, body = await token(gw, client_key.assertion(
        iat=None if iat_offset is None else now + iat_offset, exp=now + exp_ahead))
    if accepted:
        assert status == 200, body
    else:
        assert (status, body.get("error")) == (401, "invalid_client"), body
        assert "expiry too far ahead" in body["error_description"]


async def test_replayed_assertion_is_refused_after_a_restart(
        tmp_path: Path, client_key: Client) -> None:
    assertion = client_key.assertion()
    first = await start_gateway(tmp_path / "var", **auth_overrides(client_key))
    try:
        status, body = await token(first, assertion)
        assert status == 200, body
    finally:
        await first.runner.cleanup()
    second = await start_gateway(tmp_path / "var", **auth_overrides(client_key))
    try:
        status, body = await token(second, assertion)
        assert (status, body["error"]) == (401, "invalid_client"), body
        assert "already used" in body["error_description"]
        # A fresh assertion is fine: only the used id is remembered.
        assert (await token(second, client_key.assertion()))[0] == 200
    finally:
        await second.runner.cleanup()


async def test_assertion_ids_expire_from_the_store(tmp_path: Path) -> None:
    from gateway.store.replay_sqlite import SqliteReplayStore

    now = [1_000_000.0]
    store = await SqliteReplayStore.open(tmp_path / "auth.db", clock=lambda: now[0])
    try:
        await store.add(b"a" * 32, now[0] + 10)
        await store.add(b"b" * 32, now[0] + 100)
        now[0] += 50
        assert await store.unexpired() == [(b"b" * 32, 1_000_100.0)]
    finally:
        await store.close()


@pytest.mark.parametrize("kid", ["any-kid-the-client-chose", None])
async def test_pem_key_client_may_send_a_kid(gw: RunningGateway, client_key: Client,
                                              kid: str | None) -> None:
    # One key and no kid configured: the key is tried whatever kid the assertion names.
    answer, body = await token(gw, client_key.assertion(kid=kid))
    assert answer == 200, body


async def test_pem_key_client_with_a_configured_kid(tmp_path: Path,
                                                    client_key: Client) -> None:
    gw = await start_gateway(tmp_path / "var", **auth_overrides(client_key, named_kid=True))
    try:
        assert (await token(gw, client_key.assertion("named-kid", kid="key-2026")))[0] == 200
        status, body = await token(gw, client_key.assertion("named-kid", kid="key-2025"))
        assert (status, body["error"]) == (401, "invalid_client")
        assert "unknown key id" in body["error_description"]
    finally:
        await gw.runner.cleanup()


# -- item 5: mTLS subjects ---------------------------------------------------------------------


def example_lab(pki: Pki) -> Any:
    return client_context(pki, pki.example_lab_cert, pki.example_lab_key)


def allow(subject: str) -> dict[str, Any]:
    return {"mllp.tls.allowed_senders": [
        {"subject": subject, "sending_application": "SYNTHLAB"}]}


async def audited_subjects(gw: RunningGateway) -> list[str]:
    rows = await gw.app[AUDIT].search(AuditQuery(), limit=100)
    return [parse_body(row.body).get("tls_subject", "") for row in rows]


async def test_subject_made_o_then_cn_is_rendered_cn_first_and_allowed(
        tmp_path: Path, pki: Pki) -> None:
    # openssl req -subj "/O=Example Lab/CN=lab.example": RFC 4514 "CN=lab.example,O=Example Lab"
    async with tls_gateway(tmp_path, pki, **mtls(pki, **allow(
            "CN=lab.example,O=Example Lab"))) as gw:
        ack = await exchange(gw.mllp_port, with_control_id(ADT, "RDN-1"), example_lab(pki))
        assert ack["MSA"][0][1:3] == ["AA", "RDN-1"]
        assert "CN=lab.example,O=Example Lab" in await audited_subjects(gw)


@pytest.mark.parametrize("entry", [
    "cn=LAB.example , o = Example   Lab",             # case, spaces: the same name
    "2.5.4.3=lab.example,2.5.4.10=#0c0b4578616d706c65204c6162",  # OIDs, a BER value
])
async def test_allow_list_compares_names_not_strings(tmp_path: Path, pki: Pki,
                                                     entry: str) -> None:
    async with tls_gateway(tmp_path, pki, **mtls(pki, **allow(entry))) as gw:
        ack = await exchange(gw.mllp_port, with_control_id(ADT, "NAME-1"), example_lab(pki))
        assert ack["MSA"][0][1] == "AA"


async def test_reversed_rdn_order_is_refused_and_logged_by_shape(
        tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "gateway.edge.tls")
    # Today's (wrong) rendering of the O-then-CN certificate: another name under RFC 4514.
    async with tls_gateway(tmp_path, pki, **mtls(pki, **allow(
            "O=Example Lab,CN=lab.example"))) as gw:
        ack = await exchange(gw.mllp_port, with_control_id(ADT, "REV-1"), example_lab(pki))
        assert ack["MSA"][0][1] == "AR"
    (line,) = [r.getMessage() for r in caplog.records if "sender refused" in r.getMessage()
               and "CN=*,O=*" in r.getMessage() and "reverse order" in r.getMessage()]
    assert "allowed_senders[0] 'O=Example Lab,CN=lab.example'" in line
    assert len(line) < 300


def test_structural_match_needs_the_same_rdn_sequence() -> None:
    from gateway.edge import dn

    name = dn.parse("CN=lab.example,O=Example Lab")
    assert name.same_as(dn.parse("CN=Lab.Example, O=example lab"))
    assert not name.same_as(dn.parse("O=Example Lab,CN=lab.example"))
    assert not name.same_as(dn.parse("CN=lab.example\\,O=Example Lab"))  # one RDN
    assert not name.same_as(dn.parse("CN=lab.example+O=Example Lab"))    # one RDN, two AVAs
    assert dn.parse("OU=a+CN=b,O=x").same_as(dn.parse("CN=b+OU=a,O=x"))  # a set in an RDN


def _certificate_der(*attributes: tuple[x509.ObjectIdentifier, str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(("attributes", "rendered"), [
    ([(NameOID.ORGANIZATION_NAME, "Example Lab"), (NameOID.COMMON_NAME, "lab.example")],
     "CN=lab.example,O=Example Lab"),
    ([(NameOID.COUNTRY_NAME, "US"), (NameOID.ORGANIZATION_NAME, "A, B + C"),
      (NameOID.COMMON_NAME, "#1 lab=x ")],
     "CN=\\#1 lab=x\\ ,O=A\\, B \\+ C,C=US"),
    # RFC 4514 §2.4: a type without a short name is written as '#' + the value's BER.
    ([(NameOID.EMAIL_ADDRESS, "ops@lab.example"), (NameOID.COMMON_NAME, "Zürich")],
     "CN=Zürich,1.2.840.113549.1.9.1=#160f6f7073406c61622e6578616d706c65"),
])
def test_rfc4514_rendering_round_trips(attributes: list[tuple[x509.ObjectIdentifier, str]],
                                       rendered: str) -> None:
    from gateway.edge import dn

    name = dn.from_certificate(_certificate_der(*attributes))
    assert name.rfc4514() == rendered
    assert dn.parse(rendered).same_as(name)


def test_allow_list_subject_must_be_rfc4514(tmp_path: Path, pki: Pki) -> None:
    from gateway.config import load_settings

    with pytest.raises(Exception, match="unknown attribute type"):
        load_settings(None, environ={}, overrides={
            "mllp.tls.allowed_senders": [{"subject": "CN=a,XX=b",
                                          "sending_application": "A"}]})
