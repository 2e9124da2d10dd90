"""Outbound credentials against the fake EHR's token endpoint: client secrets (Basic and
form), SMART Backend Services assertions (RS384, ES384) that the fake verifies, the token
cache (one refresh under a crowd, refreshed before expiry, once after a 401), API keys,
and errors that never repeat a secret or a response body."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.forward.backend import BackendUnavailable
from gateway.forward.fhir_backend import FhirBackend, FhirBackendSpec
from gateway.forward.outbound_auth import (
    ApiKeyAuth,
    AuthSpec,
    ClientCredentials,
    NoAuth,
    SmartBackend,
    TokenUnavailable,
    build_auth,
)
from gateway.policy.jose import PrivateKey, read_unverified
from gateway.telemetry import configure
from support.fake_ehr import FakeEhr
from support.wait import ManualClock, eventually

CLIENT_ID = "isthmus-synthetic"
# Characters that RFC 6749 §2.3.1 form-encodes before Basic: a naive client gets them wrong.
SECRET = "s3cr:t+synthetic/Q9"
KID = "synthetic-key-1"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def write_pem(key: PrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


@pytest.fixture
async def ehr() -> AsyncIterator[FakeEhr]:
    fake = FakeEhr(require_token=True)
    fake.register_client(CLIENT_ID, secret=SECRET)
    await fake.start()
    yield fake
    await fake.stop()


def secret_spec(ehr: FakeEhr, secret: str = SECRET, **overrides: Any) -> AuthSpec:
    return AuthSpec(kind="client-credentials", client_id=CLIENT_ID, client_secret=secret,
                    token_url=ehr.token_url, scopes="system/Patient.rs", **overrides)


@asynccontextmanager
async def backend_for(ehr: FakeEhr, auth: AuthSpec, **overrides: Any
                      ) -> AsyncIterator[FhirBackend]:
    spec = FhirBackendSpec(name="ehr", base_url=ehr.url, auth=auth, max_retries=0,
                           backoff_base=0.01, **overrides)
    backend = await FhirBackend.open(spec, configure("none"))
    try:
        yield backend
    finally:
        await backend.close()


# -- client secrets -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_client_credentials_get_a_token_the_backend_accepts(ehr: FakeEhr,
                                                                  method: str) -> None:
    async with backend_for(ehr, secret_spec(ehr, method=method)) as backend:
        assert isinstance(backend.auth, ClientCredentials)
        response = await backend.request("GET", "metadata")
        again = await backend.request("GET", "metadata")
    assert (response.status, again.status) == (200, 200)
    assert ehr.token_methods == [method]
    assert ehr.token_requests == 1
    assert backend.auth.refreshes == 1
    assert ehr.unauthorized == 0


async def test_a_wrong_secret_is_token_unavailable_without_the_secret(ehr: FakeEhr) -> None:
    wrong = "not-the-secret-CANARY-5150"
    async with aiohttp.ClientSession() as session:
        auth = build_auth(secret_spec(ehr, secret=wrong), session)
        with pytest.raises(TokenUnavailable) as refused:
            await auth.headers()
    text = f"{refused.value} {refused.value.reason!r}"
    assert "401" in text and "invalid_client" in text
    assert wrong not in text and "CANARY" not in text  # neither secret nor body
    async with backend_for(ehr, secret_spec(ehr, secret=wrong)) as backend:
        with pytest.raises(BackendUnavailable) as unavailable:
            await backend.request("GET", "Patient/p1")
    assert "invalid_client" in unavailable.value.reason
    assert wrong not in str(unavailable.value) and "CANARY" not in str(unavailable.value)
    assert not ehr.requests  # nothing went to the FHIR endpoint without a token


def test_the_spec_repr_hides_secrets() -> None:
    spec = AuthSpec(kind="client-credentials", client_secret="hidden-CANARY-1",
                    key="hidden-CANARY-2")
    assert "CANARY" not in repr(spec)


async def test_an_unreachable_token_endpoint_is_token_unavailable() -> None:
    ehr = FakeEhr()
    await ehr.start()
    token_url = ehr.token_url
    await ehr.stop()
    async with aiohttp.ClientSession() as session:
        auth = build_auth(AuthSpec(kind="client-credentials", client_id=CLIENT_ID,
                                   client_secret=SECRET, token_url=token_url), session)
        with pytest.raises(TokenUnavailable, match="unreachable"):
            await auth.headers()


# -- SMART Backend Services ---------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
async def test_smart_backend_assertion_is_verified_by_the_server(
        ehr: FakeEhr, tmp_path: Path, alg: str, rsa_key: rsa.RSAPrivateKey,
        ec_key: ec.EllipticCurvePrivateKey) -> None:
    key: PrivateKey = rsa_key if alg == "RS384" else ec_key
    ehr.register_client("smart-client", public_key=key.public_key(), kid=KID)
    spec = AuthSpec(kind="smart-backend", client_id="smart-client", key_id=KID,
                    private_key_file=write_pem(key, tmp_path / "backend.pem"),
                    token_url=ehr.token_url, scopes="system/Patient.rs")
    async with backend_for(ehr, spec) as backend:
        assert isinstance(backend.auth, SmartBackend)
        response = await backend.request("GET", "metadata")
        assertion = backend.auth.assertion()
    assert response.status == 200
    assert ehr.token_methods == ["private_key_jwt"]
    header, claims = read_unverified(assertion)
    assert header["alg"] == alg and header["kid"] == KID
    assert claims["iss"] == claims["sub"] == "smart-client"
    assert claims["aud"] == ehr.token_url
    assert claims["exp"] <= time.time() + 300


async def test_every_assertion_has_a_fresh_jti(ehr: FakeEhr, tmp_path: Path,
                                               ec_key: ec.EllipticCurvePrivateKey) -> None:
    ehr.register_client("smart-client", public_key=ec_key.public_key())
    spec = AuthSpec(kind="smart-backend", client_id="smart-client",
                    private_key_file=write_pem(ec_key, tmp_path / "k.pem"),
                    token_url=ehr.token_url)
    async with aiohttp.ClientSession() as session:
        auth = build_auth(spec, session)
        for _ in range(3):
            sent = await auth.headers()
            auth.invalidate(sent["Authorization"])
    assert ehr.token_requests == 3
    assert len(set(ehr.jtis)) == 3  # the fake also refuses a replayed jti


async def test_an_assertion_signed_by_another_key_is_refused(
        ehr: FakeEhr, tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    ehr.register_client("smart-client", public_key=ec.generate_private_key(
        ec.SECP384R1()).public_key())
    spec = AuthSpec(kind="smart-backend", client_id="smart-client",
                    private_key_file=write_pem(ec_key, tmp_path / "k.pem"),
                    token_url=ehr.token_url)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TokenUnavailable, match="HTTP 401 invalid_client"):
            await build_auth(spec, session).headers()


@pytest.mark.parametrize(("content", "algorithm", "message"), [
    (b"-----BEGIN PRIVATE KEY-----\nCANARY-KEY-3141\n-----END PRIVATE KEY-----\n", None,
     "not an unencrypted PEM private key"),
    ("p256", None, "RSA (RS384) or EC P-384 (ES384)"),
    ("rsa", "ES384", "signs RS384, not ES384"),
])
async def test_a_bad_key_file_names_the_file_not_its_content(
        tmp_path: Path, content: bytes | str, algorithm: Any, message: str,
        rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "bad.pem"
    if content == "p256":
        write_pem(ec.generate_private_key(ec.SECP256R1()), path)
    elif content == "rsa":
        write_pem(rsa_key, path)
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    spec = AuthSpec(kind="smart-backend", client_id="c", private_key_file=path,
                    algorithm=algorithm, token_url="https://ehr.invalid/oauth/token")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ValueError) as refused:
            build_auth(spec, session)
    assert str(path) in str(refused.value) and message in str(refused.value)
    assert "CANARY" not in str(refused.value) and "BEGIN" not in str(refused.value)


async def test_a_missing_key_file_is_a_value_error(tmp_path: Path) -> None:
    spec = AuthSpec(kind="smart-backend", client_id="c", private_key_file=tmp_path / "no.pem",
                    token_url="https://ehr.invalid/oauth/token")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ValueError, match="no.pem"):
            build_auth(spec, session)


# -- the token cache ----------------------------------------------------------------------


async def test_a_hundred_requests_at_expiry_cause_one_token_request(ehr: FakeEhr) -> None:
    ehr.token_lifetime = 2  # margin = min(60, 2/2): stale after 1 s
    ehr.token_delay = 0.05  # the refresh is in flight while the crowd arrives
    async with backend_for(ehr, secret_spec(ehr), max_concurrency=100) as backend:
        assert (await backend.request("GET", "metadata")).status == 200
        assert ehr.token_requests == 1
        await asyncio.sleep(1.05)  # the token's staleness is the behaviour under test
        responses = await asyncio.gather(*(backend.request("GET", "metadata")
                                           for _ in range(100)))
    assert [r.status for r in responses] == [200] * 100
    assert ehr.token_requests == 2
    assert len({r.headers["Authorization"] for r in ehr.requests[1:]}) == 1
    assert ehr.unauthorized == 0


async def test_a_hundred_callers_past_expiry_share_one_refresh(ehr: FakeEhr) -> None:
    ehr.token_lifetime = 600
    ehr.token_delay = 0.02
    clock = ManualClock(100.0)
    async with aiohttp.ClientSession() as session:
        auth = ClientCredentials(session, secret_spec(ehr), clock=clock)
        first = await auth.headers()
        clock.now += 599  # margin 60: stale since 540 s
        crowd = await asyncio.gather(*(auth.headers() for _ in range(100)))
        clock.now += 30  # fresh
        later = await asyncio.gather(*(auth.headers() for _ in range(100)))
    assert ehr.token_requests == 2 and auth.refreshes == 2
    assert len({h["Authorization"] for h in crowd + later}) == 1
    assert crowd[0] != first


async def test_a_cancelled_caller_does_not_cancel_the_shared_refresh(ehr: FakeEhr) -> None:
    ehr.token_delay = 0.05
    async with aiohttp.ClientSession() as session:
        auth = build_auth(secret_spec(ehr), session)
        impatient = asyncio.create_task(auth.headers())
        patient = asyncio.create_task(auth.headers())
        await eventually(lambda: ehr.token_requests == 1, what="the shared refresh in flight")
        impatient.cancel()
        sent = await patient
    assert sent["Authorization"].startswith("Bearer ")
    assert ehr.token_requests == 1


async def test_the_token_is_refreshed_before_it_expires(ehr: FakeEhr) -> None:
    ehr.token_lifetime = 1
    async with backend_for(ehr, secret_spec(ehr, refresh_margin=0.4)) as backend:
        await backend.request("GET", "metadata")
        # Real time on purpose: the backend builds its token source on the monotonic clock.
        await asyncio.sleep(0.3)
        await backend.request("GET", "metadata")  # still fresh: no request
        assert ehr.token_requests == 1
        await asyncio.sleep(0.35)  # 0.65 s: inside the margin, before the expiry at 1 s
        await backend.request("GET", "metadata")
    assert ehr.token_requests == 2
    tokens = [r.headers["Authorization"] for r in ehr.requests]
    assert tokens[0] == tokens[1] != tokens[2]
    assert ehr.unauthorized == 0


async def test_a_401_makes_exactly_one_refresh(ehr: FakeEhr) -> None:
    async with backend_for(ehr, secret_spec(ehr)) as backend:
        await backend.request("GET", "metadata")
        ehr.revoke_tokens()
        responses = await asyncio.gather(*(backend.request("GET", "metadata")
                                           for _ in range(5)))
        assert [r.status for r in responses] == [200] * 5
        assert ehr.token_requests == 2
        # A server that keeps saying 401: one refresh, then its answer is passed on.
        ehr.fail_all(401)
        refused = await backend.request("GET", "Patient/p1")
    assert refused.status == 401
    assert ehr.token_requests == 3
    assert len(ehr.requests_to("GET", "Patient/p1")) == 2


# -- static credentials -------------------------------------------------------------------


async def test_api_key_goes_in_its_header_and_is_not_refreshed() -> None:
    async with FakeEhr(api_key=("X-Vendor-Key", "synthetic-key-42")) as ehr:
        good = AuthSpec(kind="api-key", header="X-Vendor-Key", key="synthetic-key-42")
        async with backend_for(ehr, good) as backend:
            assert isinstance(backend.auth, ApiKeyAuth)
            assert (await backend.request("GET", "metadata")).status == 200
        bad = AuthSpec(kind="api-key", header="X-Vendor-Key", key="wrong")
        async with backend_for(ehr, bad) as backend:
            assert (await backend.request("GET", "metadata")).status == 401
    assert ehr.token_requests == 0
    assert len(ehr.requests) == 2  # the 401 was passed on, not retried


async def test_no_auth_sends_no_credentials() -> None:
    async with FakeEhr() as ehr, backend_for(ehr, AuthSpec()) as backend:
        assert isinstance(backend.auth, NoAuth)
        await backend.request("GET", "metadata")
    assert "Authorization" not in ehr.requests[0].headers
