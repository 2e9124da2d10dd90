"""SMART Backend Services at the edge: client assertions in, access tokens out, and every
credential a protected route accepts or refuses. Tokens are minted with joserfc (an
independent JOSE implementation), never with the gateway's own signing code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from gateway.app.auth import setup_auth
from gateway.config import Settings
from gateway.edge.auth import AUTHENTICATOR, AuthError, principal_for
from gateway.edge.auth_server import AUTH_SERVER, JWT_BEARER, AuthSetupError

ALGS = ["RS256", "RS384", "ES256", "ES384", "PS384", "none"]
ISSUER = "https://idp.example"
ISSUER_AUDIENCE = "https://gw.example/fhir"
API_KEY = "ops-key-0123456789"
RSA_SCOPES = ["system/Patient.rs", "system/Slot.rs", "system/Appointment.cruds"]

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: dict[str, Any]) -> str:
    return b64(json.dumps(value).encode())


def mint(claims: dict[str, Any], key: Any, alg: str, **header: Any) -> str:
    return jwt.encode({"alg": alg, **header}, claims, key, algorithms=ALGS)


@dataclass
class Keys:
    rsa: RSAKey = field(default_factory=lambda: RSAKey.generate_key(
        2048, parameters={"kid": "rsa-1"}))
    ec: ECKey = field(default_factory=lambda: ECKey.generate_key("P-384"))
    issuer: ECKey = field(default_factory=lambda: ECKey.generate_key(
        "P-256", parameters={"kid": "idp-1"}))
    stranger_rsa: RSAKey = field(default_factory=lambda: RSAKey.generate_key(
        2048, parameters={"kid": "rsa-1"}))
    stranger_ec: ECKey = field(default_factory=lambda: ECKey.generate_key("P-384"))


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def auth_settings(tmp_path: Path, keys: Keys, **auth: Any) -> Settings:
    jwks = tmp_path / "rsa-client.jwks"
    jwks.write_text(json.dumps({"keys": [keys.rsa.as_dict(private=False)]}))
    pem = tmp_path / "ec-client.pem"
    pem.write_bytes(keys.ec.as_pem(private=False))
    idp = tmp_path / "idp.jwks"
    idp.write_text(json.dumps({"keys": [keys.issuer.as_dict(private=False)]}))
    config: dict[str, Any] = {
        "clients": [
            {"client_id": "rsa-client", "jwks_file": str(jwks), "scopes": RSA_SCOPES,
             "profile": "scheduling"},
            {"client_id": "ec-client", "public_key_file": str(pem),
             "scopes": ["system/*.rs"]},
        ],
        "issuers": [{"issuer": ISSUER, "jwks_file": str(idp), "audience": ISSUER_AUDIENCE,
                     "allowed_scopes": ["system/Patient.rs", "system/Slot.rs"]}],
        "api_keys": [{"name": "ops", "key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                      "scopes": ["system/Slot.rs"]}],
        **auth,
    }
    return Settings.model_validate({
        "store": {"data_dir": str(tmp_path / "var")}, "auth": config,
        "profiles": {"scheduling": {"Slot": ["*"]}}})


async def protected(request: web.Request) -> web.Response:
    try:
        principal = await principal_for(request)
    except AuthError as exc:
        return web.json_response({"reason": exc.reason}, status=exc.status,
                                 headers=exc.headers)
    return web.json_response({
        "client_id": principal.client_id, "scopes": principal.scopes.to_text(),
        "via": principal.via, "profile": principal.profile, "patient": principal.patient,
        "token_id": principal.token_id})


@dataclass
class Gateway:
    http: TestClient[Any, Any]
    app: web.Application
    events: list[tuple[str, str, str]]

    @property
    def token_url(self) -> str:
        return str(self.http.make_url("/auth/token"))

    @property
    def base(self) -> str:
        return str(self.http.make_url("")).rstrip("/")

    async def token(self, **form: str) -> tuple[int, dict[str, Any], Any]:
        response = await self.http.post("/auth/token", data=form)
        return response.status, await response.json(), response.headers

    async def call(self, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any],
                                                                         Any]:
        response = await self.http.get("/fhir/Patient", headers=headers or {})
        return response.status, await response.json(), response.headers

    def assertion(self, key: Any, alg: str, client_id: str = "rsa-client", **claims: Any) -> str:
        header = claims.pop("header", {})
        now = int(time.time())
        body = {"iss": client_id, "sub": client_id, "aud": self.token_url, "exp": now + 240,
                "iat": now, "jti": uuid.uuid4().hex, **claims}
        return mint({k: v for k, v in body.items() if v is not None}, key, alg, **header)

    def form(self, assertion: str, scope: str = "system/*.rs", **extra: str) -> dict[str, str]:
        return {"grant_type": "client_credentials", "client_assertion_type": JWT_BEARER,
                "client_assertion": assertion, "scope": scope, **extra}

    async def access_token(self, keys: Keys, scope: str = "system/Patient.rs") -> str:
        status, body, _ = await self.token(**self.form(self.assertion(keys.rsa, "RS384"), scope))
        assert status == 200, body
        return str(body["access_token"])


async def start(aiohttp_client: AiohttpClient, settings: Settings) -> Gateway:
    events: list[tuple[str, str, str]] = []

    async def on_token(client_id: str, outcome: str, peer: str) -> None:
        events.append((client_id, outcome, peer))

    app = web.Application()
    setup_auth(app, settings, on_token=on_token)
    app.router.add_get("/fhir/Patient", protected)
    return Gateway(await aiohttp_client(app), app, events)


@pytest.fixture
async def gw(aiohttp_client: AiohttpClient, tmp_path: Path, keys: Keys) -> Gateway:
    return await start(aiohttp_client, auth_settings(tmp_path, keys))


def our_signing_key(tmp_path: Path) -> ECKey:
    return ECKey.import_key((tmp_path / "var" / "keys" / "token-signing.pem").read_bytes())


# -- the token endpoint -------------------------------------------------------------------


async def test_rs384_client_assertion_gets_an_access_token(gw: Gateway, keys: Keys) -> None:
    status, body, headers = await gw.token(**gw.form(gw.assertion(keys.rsa, "RS384"),
                                                     "system/Patient.rs"))
    assert status == 200, body
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "system/Patient.rs"
    assert headers["Cache-Control"] == "no-store"
    assert gw.events == [("rsa-client", "success", "127.0.0.1")]


async def test_es384_client_assertion_with_a_pem_key_and_no_kid(gw: Gateway, keys: Keys) -> None:
    status, body, _ = await gw.token(**gw.form(gw.assertion(keys.ec, "ES384", "ec-client"),
                                               "system/Observation.rs"))
    assert status == 200, body
    assert body["scope"] == "system/Observation.rs"


@pytest.mark.parametrize(("requested", "granted"), [
    ("system/*.rs", "system/Appointment.rs system/Patient.rs system/Slot.rs"),
    ("system/Patient.cruds", "system/Patient.rs"),
    ("system/Patient.read", "system/Patient.rs"),
    ("system/*.write", "system/Appointment.cud"),
    ("system/Observation.rs system/Slot.s launch openid", "system/Slot.s"),
    ("system/Slot.rs?status=free", "system/Slot.rs?status=free"),
])
async def test_granted_scope_is_the_intersection(gw: Gateway, keys: Keys, requested: str,
                                                 granted: str) -> None:
    status, body, _ = await gw.token(**gw.form(gw.assertion(keys.rsa, "RS384"), requested))
    assert status == 200, body
    assert body["scope"] == granted


def _hs256_with_public_key(gw: Gateway, keys: Keys) -> str:
    now = int(time.time())
    signing_input = (b64json({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}) + "."
                     + b64json({"iss": "rsa-client", "sub": "rsa-client", "aud": gw.token_url,
                                "exp": now + 240, "jti": uuid.uuid4().hex}))
    secret = keys.rsa.as_pem(private=False)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _es256_on_p384(token_url: str, keys: Keys) -> str:
    now = int(time.time())
    signing_input = (b64json({"alg": "ES256", "typ": "JWT"}) + "."
                     + b64json({"iss": "ec-client", "sub": "ec-client", "aud": token_url,
                                "exp": now + 240, "jti": uuid.uuid4().hex}))
    private = keys.ec.private_key
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    r, s = decode_dss_signature(private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64(r.to_bytes(48, 'big') + s.to_bytes(48, 'big'))}"


def _alg_none(gw: Gateway, keys: Keys) -> str:
    now = int(time.time())
    return (b64json({"alg": "none", "typ": "JWT"}) + "."
            + b64json({"iss": "rsa-client", "sub": "rsa-client", "aud": gw.token_url,
                       "exp": now + 240, "jti": uuid.uuid4().hex}) + ".")


Case = Callable[[Gateway, Keys], dict[str, str]]
ASSERTION_REFUSED = (401, "invalid_client")
# case -> (form, status, error, what the description says)
REFUSALS: dict[str, tuple[Case, int, str, str]] = {
    "alg none": (lambda g, k: g.form(_alg_none(g, k)), *ASSERTION_REFUSED,
                 "algorithm not allowed"),
    "HS256 keyed with the public key": (
        lambda g, k: g.form(_hs256_with_public_key(g, k)), *ASSERTION_REFUSED,
        "algorithm not allowed"),
    "ES256 on a P-384 key": (lambda g, k: g.form(_es256_on_p384(g.token_url, k)),
                             *ASSERTION_REFUSED, "algorithm not allowed"),
    "RS256 not allowed for assertions": (
        lambda g, k: g.form(g.assertion(k.rsa, "RS256")), *ASSERTION_REFUSED,
        "algorithm not allowed"),
    "RS384 header on an EC key": (
        lambda g, k: g.form(g.assertion(k.rsa, "RS384", "ec-client")), *ASSERTION_REFUSED,
        "algorithm does not match the key"),
    "unknown kid": (lambda g, k: g.form(g.assertion(k.rsa, "RS384", header={"kid": "nope"})),
                    *ASSERTION_REFUSED, "unknown key id"),
    "signed by another key under the client's kid": (
        lambda g, k: g.form(g.assertion(k.stranger_rsa, "RS384")), *ASSERTION_REFUSED,
        "bad signature"),
    "signed by another EC key": (
        lambda g, k: g.form(g.assertion(k.stranger_ec, "ES384", "ec-client")),
        *ASSERTION_REFUSED, "bad signature"),
    "iss differs from sub": (
        lambda g, k: g.form(g.assertion(k.rsa, "RS384", sub="ec-client")), *ASSERTION_REFUSED,
        "sub must equal iss"),
    "wrong aud": (lambda g, k: g.form(g.assertion(k.rsa, "RS384", aud="https://x/auth/token")),
                  *ASSERTION_REFUSED, "aud must be the token endpoint"),
    "exp more than five minutes ahead": (
        lambda g, k: g.form(g.assertion(k.rsa, "RS384", exp=int(time.time()) + 900)),
        *ASSERTION_REFUSED, "expiry too far ahead"),
    "expired": (lambda g, k: g.form(g.assertion(k.rsa, "RS384", exp=int(time.time()) - 120)),
                *ASSERTION_REFUSED, "expired"),
    "no exp": (lambda g, k: g.form(g.assertion(k.rsa, "RS384", exp=None)),
               *ASSERTION_REFUSED, "no expiry"),
    "nbf in the future": (
        lambda g, k: g.form(g.assertion(k.rsa, "RS384", nbf=int(time.time()) + 200)),
        *ASSERTION_REFUSED, "not yet valid"),
    "no jti": (lambda g, k: g.form(g.assertion(k.rsa, "RS384", jti=None)),
               *ASSERTION_REFUSED, "jti is required"),
    "unknown client": (
        lambda g, k: g.form(g.assertion(k.rsa, "RS384", "someone-else")), *ASSERTION_REFUSED,
        "unknown client"),
    "jku header": (
        lambda g, k: g.form(g.assertion(k.rsa, "RS384",
                                        header={"jku": "https://evil.example/jwks"})),
        *ASSERTION_REFUSED, "header parameter not allowed"),
    "jwk header carrying the attacker's key": (
        lambda g, k: g.form(g.assertion(k.stranger_ec, "ES384", "ec-client", header={
            "jwk": k.stranger_ec.as_dict(private=False)})), *ASSERTION_REFUSED,
        "header parameter not allowed"),
    "crit header": (
        lambda g, k: g.form(g.assertion(k.rsa, "RS384", header={"crit": ["kid"], "kid": "rsa-1"})),
        *ASSERTION_REFUSED, "header parameter not allowed"),
    "not a JWT": (lambda g, k: g.form("not.a.jwt"), *ASSERTION_REFUSED, "not a JWT"),
    "wrong grant_type": (
        lambda g, k: {**g.form(g.assertion(k.rsa, "RS384")), "grant_type": "authorization_code"},
        400, "unsupported_grant_type", "client_credentials"),
    "missing grant_type": (
        lambda g, k: {n: v for n, v in g.form(g.assertion(k.rsa, "RS384")).items()
                      if n != "grant_type"}, 400, "invalid_request", "grant_type"),
    "missing assertion type": (
        lambda g, k: {n: v for n, v in g.form(g.assertion(k.rsa, "RS384")).items()
                      if n != "client_assertion_type"}, 400, "invalid_request",
        "client_assertion_type"),
    "other assertion type": (
        lambda g, k: {**g.form(g.assertion(k.rsa, "RS384")), "client_assertion_type":
                      "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"},
        *ASSERTION_REFUSED, "client_assertion_type"),
    "client secret": (
        lambda g, k: g.form(g.assertion(k.rsa, "RS384"), client_secret="s3cret"),
        *ASSERTION_REFUSED, "private_key_jwt"),
    "client_id not the assertion's": (
        lambda g, k: g.form(g.assertion(k.rsa, "RS384"), client_id="ec-client"),
        *ASSERTION_REFUSED, "client_id"),
    "missing scope": (
        lambda g, k: {n: v for n, v in g.form(g.assertion(k.rsa, "RS384")).items()
                      if n != "scope"}, 400, "invalid_request", "scope is required"),
    "no requested scope allowed": (
        lambda g, k: g.form(g.assertion(k.rsa, "RS384"), "system/Observation.rs patient/*.rs"),
        400, "invalid_scope", "none of the requested scopes"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_token_request_refused(gw: Gateway, keys: Keys, case: str) -> None:
    build, status, error, reason = REFUSALS[case]
    form = build(gw, keys)
    got_status, body, headers = await gw.token(**form)
    assert (got_status, body["error"]) == (status, error), body
    assert reason in body["error_description"]
    assert headers["Cache-Control"] == "no-store"
    # The description never repeats the request's token content.
    for part in form.get("client_assertion", "").split("."):
        if len(part) > 8:
            assert part not in body["error_description"]
    [(client, outcome, peer)] = gw.events
    assert (outcome, peer) == (error, "127.0.0.1")
    # Recorded against the registered client the assertion names, never an unknown one.
    assert client in ("", "rsa-client", "ec-client")


async def test_replayed_jti_is_refused_within_its_lifetime(gw: Gateway, keys: Keys) -> None:
    assertion = gw.assertion(keys.rsa, "RS384")
    first, _, _ = await gw.token(**gw.form(assertion))
    again, body, _ = await gw.token(**gw.form(assertion))
    assert (first, again, body["error"]) == (200, 401, "invalid_client")
    assert "already used" in body["error_description"]
    same_jti = gw.assertion(keys.rsa, "RS384", jti=json.loads(
        base64.urlsafe_b64decode(assertion.split(".")[1] + "==="))["jti"])
    status, body, _ = await gw.token(**gw.form(same_jti))
    assert (status, body["error"]) == (401, "invalid_client")
    assert gw.events == [("rsa-client", "success", "127.0.0.1"),
                         ("rsa-client", "invalid_client", "127.0.0.1"),
                         ("rsa-client", "invalid_client", "127.0.0.1")]


async def test_form_must_be_urlencoded_and_each_parameter_once(gw: Gateway, keys: Keys) -> None:
    response = await gw.http.post("/auth/token", json=gw.form(gw.assertion(keys.rsa, "RS384")))
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"
    body = "&".join(f"{k}={v}" for k, v in gw.form(gw.assertion(keys.rsa, "RS384")).items())
    response = await gw.http.post(
        "/auth/token", data=body + "&scope=system/Slot.rs",
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"


# -- our access tokens on a protected route -----------------------------------------------


async def test_access_token_opens_the_protected_route(gw: Gateway, keys: Keys,
                                                      tmp_path: Path) -> None:
    token = await gw.access_token(keys, "system/*.rs")
    status, body, _ = await gw.call({"Authorization": f"Bearer {token}"})
    assert status == 200, body
    assert body["client_id"] == "rsa-client"
    assert body["scopes"] == "system/Appointment.rs system/Patient.rs system/Slot.rs"
    assert (body["via"], body["profile"]) == ("smart", "scheduling")
    # The token itself, checked by joserfc against our published JWKS.
    jwks = await (await gw.http.get("/auth/jwks")).json()
    decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES384"])
    assert decoded.header["alg"] == "ES384"
    assert decoded.header["kid"] == our_signing_key(tmp_path).thumbprint()
    claims = decoded.claims
    assert claims["iss"] == gw.base
    assert claims["aud"] == f"{gw.base}/fhir"
    assert claims["sub"] == claims["client_id"] == "rsa-client"
    assert claims["exp"] - claims["iat"] == 300
    assert claims["nbf"] <= time.time()
    assert claims["profile"] == "scheduling"
    assert body["token_id"] == claims["jti"]


async def test_access_token_is_also_accepted_from_the_cache(gw: Gateway, keys: Keys) -> None:
    token = await gw.access_token(keys)
    for _ in range(3):
        status, body, _ = await gw.call({"Authorization": f"bearer {token}"})
        assert (status, body["client_id"]) == (200, "rsa-client")


async def test_expired_access_token_is_refused_even_when_cached(gw: Gateway,
                                                                keys: Keys) -> None:
    token = await gw.access_token(keys)
    assert (await gw.call({"Authorization": f"Bearer {token}"}))[0] == 200
    server = gw.app[AUTH_SERVER]
    server.clock = lambda: time.time() + 400
    status, body, headers = await gw.call({"Authorization": f"Bearer {token}"})
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_expired_access_token_is_refused(gw: Gateway, keys: Keys) -> None:
    token = await gw.access_token(keys)
    gw.app[AUTH_SERVER].clock = lambda: time.time() + 400
    status, body, headers = await gw.call({"Authorization": f"Bearer {token}"})
    assert (status, body["reason"]) == (401, "expired")
    assert headers["WWW-Authenticate"].startswith('Bearer realm="isthmus", error="invalid_token"')


def _forgeries(gw: Gateway, keys: Keys, tmp_path: Path, token: str) -> dict[str, str]:
    header_b64, payload_b64, signature_b64 = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "==="))
    claims = json.loads(base64.urlsafe_b64decode(payload_b64 + "==="))
    ours = our_signing_key(tmp_path)
    stranger = ECKey.generate_key("P-384")
    widened = {**claims, "scope": "system/*.cruds"}
    now = int(time.time())
    hs_input = b64json({"alg": "HS256", "kid": header["kid"], "typ": "at+jwt"}) + "." + \
        b64json(widened)
    hs_mac = hmac.new(ours.as_pem(private=False), hs_input.encode(), hashlib.sha256).digest()
    return {
        "payload changed": f"{header_b64}.{b64json(widened)}.{signature_b64}",
        "signed by another key under our kid": mint(widened, stranger, "ES384",
                                                    kid=header["kid"], typ="at+jwt"),
        "HS256 keyed with our public key": f"{hs_input}.{b64(hs_mac)}",
        "alg none": b64json({"alg": "none", "typ": "at+jwt"}) + "." + b64json(widened) + ".",
        "other audience": mint({**claims, "aud": "https://elsewhere.example/fhir"}, ours,
                               "ES384", kid=header["kid"], typ="at+jwt"),
        "other issuer": mint({**claims, "iss": "https://elsewhere.example"}, ours, "ES384",
                             kid=header["kid"], typ="at+jwt"),
        "not yet valid": mint({**claims, "nbf": now + 600}, ours, "ES384", kid=header["kid"],
                              typ="at+jwt"),
        "a client assertion": gw.assertion(keys.rsa, "RS384"),
        "garbage": "abc.def",
    }


@pytest.mark.parametrize(("forgery", "reason"), [
    ("payload changed", "bad signature"),
    ("signed by another key under our kid", "bad signature"),
    ("HS256 keyed with our public key", "algorithm not allowed"),
    ("alg none", "algorithm not allowed"),
    ("other audience", "wrong audience"),
    ("other issuer", "unknown issuer"),
    ("not yet valid", "not yet valid"),
    ("a client assertion", "unknown issuer"),
    ("garbage", "not a compact JWS"),
])
async def test_forged_access_token_is_refused(gw: Gateway, keys: Keys, tmp_path: Path,
                                              forgery: str, reason: str) -> None:
    token = await gw.access_token(keys)
    forged = _forgeries(gw, keys, tmp_path, token)[forgery]
    status, body, headers = await gw.call({"Authorization": f"Bearer {forged}"})
    assert (status, body["reason"]) == (401, reason)
    assert headers["WWW-Authenticate"] == (f'Bearer realm="isthmus", error="invalid_token", '
                                           f'error_description="{reason}"')


async def test_token_minted_for_another_host_is_refused(gw: Gateway, keys: Keys) -> None:
    token = await gw.access_token(keys)
    status, _, headers = await gw.call({"Authorization": f"Bearer {token}",
                                        "Host": "other.example"})
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_configured_issuer_and_fhir_base_name_the_token(
        aiohttp_client: AiohttpClient, tmp_path: Path, keys: Keys) -> None:
    settings = auth_settings(tmp_path, keys, issuer="https://gw.example/")
    settings = Settings.model_validate({**settings.model_dump(),
                                        "fhir": {"base_url": "https://api.example/r4"}})
    gw = await start(aiohttp_client, settings)
    wrong_aud = gw.assertion(keys.rsa, "RS384")  # our Host, not the configured issuer
    assert (await gw.token(**gw.form(wrong_aud)))[1]["error"] == "invalid_client"
    status, body, _ = await gw.token(**gw.form(gw.assertion(
        keys.rsa, "RS384", aud="https://gw.example/auth/token")))
    assert status == 200, body
    claims = jwt.decode(body["access_token"], our_signing_key(tmp_path),
                        algorithms=["ES384"]).claims
    assert (claims["iss"], claims["aud"]) == ("https://gw.example", "https://api.example/r4")
    assert (await gw.call({"Authorization": f"Bearer {body['access_token']}"}))[0] == 200


async def test_client_removed_from_config_loses_its_tokens(
        aiohttp_client: AiohttpClient, tmp_path: Path, keys: Keys) -> None:
    gw = await start(aiohttp_client, auth_settings(tmp_path, keys))
    token = await gw.access_token(keys)
    settings = auth_settings(tmp_path, keys)
    restarted = await start(aiohttp_client, Settings.model_validate({
        **settings.model_dump(), "auth": {**settings.auth.model_dump(), "clients": []}}))
    # Same signing key (same data dir); the Host of the first app, so the issuer matches.
    headers = {"Authorization": f"Bearer {token}", "Host": f"{gw.http.host}:{gw.http.port}"}
    status, body, _ = await restarted.call(headers)
    assert (status, body["reason"]) == (401, "client no longer registered")


# -- external issuers ---------------------------------------------------------------------


def external(keys: Keys, key: Any = None, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": ISSUER_AUDIENCE, "sub": "svc-42", "client_id": "voice-agent",
            "scope": "system/Patient.rs system/Observation.rs", "iat": now, "exp": now + 120,
            "jti": "ext-1", "patient": "123", **claims}
    return mint({k: v for k, v in body.items() if v is not None}, key or keys.issuer, "ES256",
                kid="idp-1")


async def test_external_issuer_token_is_accepted_and_cut_to_its_scopes(gw: Gateway,
                                                                       keys: Keys) -> None:
    status, body, _ = await gw.call({"Authorization": f"Bearer {external(keys)}"})
    assert status == 200, body
    assert body == {"client_id": "voice-agent", "scopes": "system/Patient.rs", "via": "issuer",
                    "profile": None, "patient": "Patient/123", "token_id": "ext-1"}


async def test_external_issuer_client_falls_back_to_azp_then_sub(gw: Gateway,
                                                                 keys: Keys) -> None:
    token = external(keys, client_id=None, azp="agent-azp")
    assert (await gw.call({"Authorization": f"Bearer {token}"}))[1]["client_id"] == "agent-azp"
    token = external(keys, client_id=None)
    assert (await gw.call({"Authorization": f"Bearer {token}"}))[1]["client_id"] == "svc-42"


@pytest.mark.parametrize(("claims", "reason"), [
    ({"iss": "https://other-idp.example"}, "unknown issuer"),
    ({"aud": "https://other.example/fhir"}, "wrong audience"),
    ({"exp": int(time.time()) - 600}, "expired"),
    ({"exp": None}, "no expiry"),
    ({"nbf": int(time.time()) + 600}, "not yet valid"),
])
async def test_external_issuer_token_refused(gw: Gateway, keys: Keys, claims: dict[str, Any],
                                             reason: str) -> None:
    status, body, headers = await gw.call({"Authorization": f"Bearer {external(keys, **claims)}"})
    assert (status, body["reason"]) == (401, reason)
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_external_token_signed_by_another_key_is_refused(gw: Gateway,
                                                               keys: Keys) -> None:
    stranger = ECKey.generate_key("P-256", parameters={"kid": "idp-1"})
    status, body, _ = await gw.call({"Authorization": f"Bearer {external(keys, stranger)}"})
    assert (status, body["reason"]) == (401, "bad signature")


async def test_external_token_without_usable_scopes_is_forbidden(gw: Gateway,
                                                                 keys: Keys) -> None:
    token = external(keys, scope="system/Observation.rs")
    status, body, headers = await gw.call({"Authorization": f"Bearer {token}"})
    assert status == 403
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]


# -- API keys and anonymous access --------------------------------------------------------


@pytest.mark.parametrize("headers", [{"X-API-Key": API_KEY},
                                     {"Authorization": f"ApiKey {API_KEY}"}])
async def test_api_key_is_accepted(gw: Gateway, headers: dict[str, str]) -> None:
    status, body, _ = await gw.call(headers)
    assert status == 200
    assert (body["client_id"], body["via"], body["scopes"]) == ("ops", "api-key",
                                                                 "system/Slot.rs")


@pytest.mark.parametrize("headers", [{"X-API-Key": API_KEY + "x"},
                                     {"Authorization": "ApiKey nope"},
                                     {"X-API-Key": API_KEY, "Authorization": f"ApiKey {API_KEY}"},
                                     {"Authorization": f"Basic {API_KEY}"}])
async def test_wrong_api_key_is_refused(gw: Gateway, headers: dict[str, str]) -> None:
    status, body, response_headers = await gw.call(headers)
    assert status == 401
    assert "WWW-Authenticate" in response_headers
    assert API_KEY not in json.dumps(body) + response_headers["WWW-Authenticate"]


async def test_no_credentials_is_401_unless_anonymous_is_configured(
        gw: Gateway, aiohttp_client: AiohttpClient, tmp_path: Path, keys: Keys) -> None:
    status, body, headers = await gw.call()
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="isthmus", ApiKey realm="isthmus"'

    anonymous = await start(aiohttp_client, auth_settings(
        tmp_path, keys, anonymous=True, anonymous_scopes=["system/Slot.rs"]))
    status, body, _ = await anonymous.call()
    assert status == 200
    assert (body["client_id"], body["via"], body["scopes"]) == ("anonymous", "anonymous",
                                                                 "system/Slot.rs")
    # A bad credential is refused, not downgraded to anonymous.
    status, _, _ = await anonymous.call({"Authorization": "Bearer not-a-token"})
    assert status == 401


# -- discovery, keys, configuration -------------------------------------------------------


async def test_smart_configuration_document(gw: Gateway) -> None:
    response = await gw.http.get("/.well-known/smart-configuration")
    assert response.status == 200
    document = await response.json()
    assert document["token_endpoint"] == gw.token_url
    assert document["issuer"] == gw.base
    assert document["jwks_uri"] == f"{gw.base}/auth/jwks"
    assert document["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert document["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert document["grant_types_supported"] == ["client_credentials"]
    assert set(document["capabilities"]) >= {"client-confidential-asymmetric", "permission-v2",
                                             "permission-v1"}
    assert document["scopes_supported"] == sorted(
        {"system/*.rs", "system/Appointment.cruds", "system/Patient.rs", "system/Slot.rs"})


async def test_signing_key_generated_owner_only_and_reused(
        aiohttp_client: AiohttpClient, tmp_path: Path, keys: Keys) -> None:
    first = await start(aiohttp_client, auth_settings(tmp_path, keys))
    path = tmp_path / "var" / "keys" / "token-signing.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = await start(aiohttp_client, auth_settings(tmp_path, keys))
    assert first.app[AUTH_SERVER].key_id == second.app[AUTH_SERVER].key_id
    jwks = await (await second.http.get("/auth/jwks")).json()
    assert [k["kid"] for k in jwks["keys"]] == [our_signing_key(tmp_path).thumbprint()]
    assert "d" not in jwks["keys"][0]


async def test_configured_signing_key_must_be_p384(tmp_path: Path, keys: Keys) -> None:
    p256 = tmp_path / "p256.pem"
    p256.write_bytes(ECKey.generate_key("P-256").as_pem(private=True))
    settings = auth_settings(tmp_path, keys, signing_key_file=str(p256))
    with pytest.raises(AuthSetupError, match="P-384"):
        setup_auth(web.Application(), settings)
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(keys.stranger_ec.as_pem(private=True))
    app = web.Application()
    setup_auth(app, auth_settings(tmp_path, keys, signing_key_file=str(p384)))
    assert app[AUTH_SERVER].key_id == keys.stranger_ec.thumbprint()


async def test_malformed_configured_scope_stops_set_up(tmp_path: Path, keys: Keys) -> None:
    settings = auth_settings(tmp_path, keys, anonymous=True,
                             anonymous_scopes=["system/Patient.rsx"])
    with pytest.raises(AuthSetupError, match="auth.anonymous_scopes"):
        setup_auth(web.Application(), settings)


async def test_verified_token_cache_is_bounded(gw: Gateway, keys: Keys) -> None:
    authenticator = gw.app[AUTHENTICATOR]
    authenticator._cache_size = 2
    for _ in range(4):
        token = await gw.access_token(keys)
        assert (await gw.call({"Authorization": f"Bearer {token}"}))[0] == 200
    assert len(authenticator._cache) == 2


# -- the JOSE layer directly --------------------------------------------------------------


def test_es256_header_on_a_p384_key_is_refused_even_when_es256_is_allowed(
        keys: Keys) -> None:
    from gateway.policy.jose import KeySet as OurKeySet
    from gateway.policy.jose import TokenError, public_key_from_pem, verify_jwt

    token = _es256_on_p384("https://gw.example/auth/token", keys)
    ours = OurKeySet.of(public_key_from_pem(keys.ec.as_pem(private=False)))
    with pytest.raises(TokenError, match="algorithm does not match the key"):
        verify_jwt(token, ours, allowed_algs=["ES256", "ES384"])
    # The same key verifies an honest ES384 token minted by joserfc.
    honest = mint({"a": 1}, keys.ec, "ES384")
    assert verify_jwt(honest, ours, allowed_algs=["ES384"])[1] == {"a": 1}


def test_key_set_refuses_weak_rsa_and_skips_symmetric_keys(keys: Keys) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from gateway.policy.jose import load_jwks

    weak = rsa.generate_private_key(65537, 1024).public_key().public_numbers()
    weak_jwk = {"kty": "RSA", "n": b64(weak.n.to_bytes(128, "big")), "e": b64(b"\x01\x00\x01")}
    with pytest.raises(ValueError, match="2048"):
        load_jwks({"keys": [weak_jwk]})
    mixed = load_jwks({"keys": [{"kty": "oct", "k": b64(b"secret")},
                                {**keys.issuer.as_dict(private=False), "use": "enc"},
                                keys.rsa.as_dict(private=False)]})
    assert [k.kid for k in mixed] == ["rsa-1"]
    with pytest.raises(ValueError, match="no RSA or EC"):
        load_jwks({"keys": [{"kty": "oct", "k": b64(b"secret")}]})


def test_token_without_kid_needs_exactly_one_fitting_key(keys: Keys) -> None:
    from gateway.policy.jose import TokenError, load_jwks, verify_jwt

    token = mint({"a": 1}, keys.stranger_ec, "ES384")
    two = load_jwks({"keys": [keys.ec.as_dict(private=False),
                              keys.stranger_ec.as_dict(private=False)]})
    with pytest.raises(TokenError, match="names no key id"):
        verify_jwt(token, two, allowed_algs=["ES384"])
    one = load_jwks({"keys": [keys.stranger_ec.as_dict(private=False),
                              keys.rsa.as_dict(private=False)]})
    assert verify_jwt(token, one, allowed_algs=["ES384"])[1] == {"a": 1}


def test_duplicate_claim_names_are_refused(keys: Keys) -> None:
    from gateway.policy.jose import TokenError, load_jwks, verify_jwt

    private = keys.ec.private_key
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    payload = b64(b'{"sub":"a","sub":"b"}')
    signing_input = f"{b64json({'alg': 'ES384'})}.{payload}"
    r, s = decode_dss_signature(private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA384())))
    token = f"{signing_input}.{b64(r.to_bytes(48, 'big') + s.to_bytes(48, 'big'))}"
    with pytest.raises(TokenError, match="not a compact JWS"):
        verify_jwt(token, load_jwks({"keys": [keys.ec.as_dict(private=False)]}),
                   allowed_algs=["ES384"])
