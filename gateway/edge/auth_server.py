"""SMART Backend Services: our token endpoint.

`POST /auth/token` takes a client_credentials grant authenticated with a private_key_jwt
client assertion (SMART App Launch 2.x §Backend Services, RFC 7523 §2.2) and answers an
ES384 access token (RFC 9068 shape) holding the granted scopes; the SMART configuration
and our JWKS are published beside it. Who calls a protected route is `auth`'s question.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.edge.errors import AuthSetupError as AuthSetupError  # defined with the edge's root
from gateway.edge.errors import OAuthError as OAuthError  # defined with the edge's root
from gateway.policy.jose import (
    KeySet,
    TokenError,
    check_times,
    has_audience,
    public_jwk,
    read_unverified,
    sign_jwt,
    thumbprint,
    verify_jwt,
)
from gateway.policy.principal import Principal, patient_reference
from gateway.policy.scopes import ScopeError, ScopeSet, grant
from gateway.store.errors import StoreUnavailable

# The logger these lines have always carried (operators filter on it).
log = logging.getLogger("gateway.edge.auth")

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services §Authenticating: servers SHALL support RS384 and ES384; we take
# exactly those for client assertions.
ASSERTION_ALGS = ("RS384", "ES384")
ACCESS_TOKEN_ALG = "ES384"
ACCESS_TOKEN_TYPE = "at+jwt"  # RFC 9068 §2.1
MAX_ASSERTION_AHEAD = 300  # SMART: exp no more than five minutes in the future
MAX_TOKEN_LIFETIME = 300
# The clock skew allowed to other parties' clocks (client assertions, external issuers'
# tokens); never to the exp of a token we signed (our clock alone decides its end).
CLOCK_SKEW = 30
# How long a token request waits for its audit record before answering 503: a locked or
# slow audit store must not hold a client (and a connection) for the store's busy timeout.
AUDIT_WAIT = 2.0
RETRY_AFTER = 5
KEYS_DIR = "keys"
SIGNING_KEY_FILE = "token-signing.pem"
MAX_FORM_BYTES = 64 * 1024
MAX_FORM_FIELDS = 16

TokenHook = Callable[[str, str, str], Awaitable[None]]
"""(client_id, outcome, peer): outcome is 'success' or the OAuth error code."""

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1
JTI = re.compile(r"[\x20-\x7e]{1,256}")
"""A usable token id (jti): printable ASCII, bounded."""


def unavailable(description: str) -> OAuthError:
    """503 temporarily_unavailable (the RFC 6749 §4.1.2.1 code, used by token endpoints
    too): nothing was issued, try again after Retry-After."""
    return OAuthError("temporarily_unavailable", description, 503, RETRY_AFTER)


@dataclass(frozen=True, slots=True)
class Client:
    """A registered backend-services client: its keys and the scopes it may be granted."""

    client_id: str
    keys: KeySet
    scopes: tuple[str, ...]
    profile: str | None = None
    patient: str | None = None


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Our URLs for one request: configured, or derived from its scheme and Host."""

    issuer: str
    token_url: str
    jwks_uri: str
    audience: str


@dataclass(frozen=True, slots=True)
class IssuedToken:
    access_token: str
    expires_in: int
    scope: str

    def as_json(self) -> dict[str, Any]:
        return {"access_token": self.access_token, "token_type": "bearer",
                "expires_in": self.expires_in, "scope": self.scope}


class ReplayStore(Protocol):
    """Where assertion ids outlive the process (`gateway.store.replay_sqlite`)."""

    async def add(self, key: bytes, expires_at: float) -> bool | None:
        """Keep `key` durably until `expires_at`; StoreUnavailable when it cannot. False:
        the store had it already (another instance saw the assertion first)."""
        ...


class ReplayCache:
    """Assertion ids seen, kept until they expire (RFC 7523 §3 item 7).

    Checked in memory (one dict lookup, and no await between the check and the insert,
    so two concurrent requests with one assertion cannot both pass); with a store
    attached, each new id is also written through before its token is issued, and the
    ids still unexpired are loaded back at start: a restart does not reopen the window.
    One instance's cache; several instances behind a load balancer share the store
    (PostgreSQL's), which refuses an id another instance kept first.
    """

    def __init__(self, clock: Callable[[], float] = time.time,
                 max_entries: int = 100_000) -> None:
        self._clock = clock
        self._max = max_entries
        self._seen: dict[bytes, float] = {}
        self._expiry: list[tuple[float, bytes]] = []
        self._store: ReplayStore | None = None

    @staticmethod
    def key(client_id: str, jti: str) -> bytes:
        # Fixed size, and no client-chosen text in the file.
        return hashlib.sha256(f"{client_id}\n{jti}".encode()).digest()

    def attach(self, store: ReplayStore, unexpired: Iterable[tuple[bytes, float]]) -> None:
        """Write new ids through to `store`; `unexpired`: the ids it kept from before."""
        for key, expires_at in unexpired:
            # Past the bound too: dropping an unexpired id would reopen its replay.
            self._remember(key, expires_at, bounded=False)
        self._store = store

    async def first_use(self, key: bytes, expires_at: float) -> bool:
        """Record `key`; False when it was already seen and has not expired. Raises
        StoreUnavailable when the id could not be kept durably (it is kept in memory)."""
        if not self._remember(key, expires_at):
            return False
        if self._store is not None and await self._store.add(key, expires_at) is False:
            return False
        return True

    def _remember(self, key: bytes, expires_at: float, *, bounded: bool = True) -> bool:
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, old = heapq.heappop(self._expiry)
            if self._seen.get(old, now + 1) <= now:
                del self._seen[old]
        if key in self._seen:
            return False
        if bounded and len(self._seen) >= self._max:
            # Fail closed: forgetting an unexpired id would let it be replayed.
            raise TokenError("too many assertions in flight")
        self._seen[key] = expires_at
        heapq.heappush(self._expiry, (expires_at, key))
        return True


class AuthorizationServer:
    """Authenticates clients' assertions and signs access tokens with our EC P-384 key."""

    def __init__(self, clients: Iterable[Client], signing_key: ec.EllipticCurvePrivateKey,
                 *, issuer: str = "", fhir_base: str = "",
                 token_lifetime: int = MAX_TOKEN_LIFETIME, on_token: TokenHook | None = None,
                 replay: ReplayCache | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not isinstance(signing_key.curve, ec.SECP384R1):
            raise ValueError("the token signing key must be EC P-384")
        self.clients = {c.client_id: c for c in clients}
        self.on_token = on_token
        self.clock = clock
        self._key = signing_key
        self._kid = thumbprint(signing_key.public_key())
        self._keyset = KeySet.of(signing_key.public_key(), self._kid, ACCESS_TOKEN_ALG)
        self._issuer = issuer.rstrip("/")
        self._fhir_base = fhir_base.rstrip("/")
        self._lifetime = min(token_lifetime, MAX_TOKEN_LIFETIME)
        self.replay = replay or ReplayCache(clock)

    @property
    def key_id(self) -> str:
        return self._kid

    def endpoints(self, request: web.BaseRequest) -> Endpoints:
        # Derived from Host only when auth.issuer is unset (zero-config): set it in
        # production so a client's assertion audience cannot be chosen by a Host header.
        base = self._issuer or f"{request.scheme}://{request.host}"
        return Endpoints(issuer=base, token_url=f"{base}/auth/token",
                         jwks_uri=f"{base}/auth/jwks",
                         audience=self._fhir_base or f"{base}/fhir")

    async def record(self, client_id: str, outcome: str, peer: str) -> None:
        """Tell the audit hook; it runs before the answer, so its failure fails the request:
        a 503 (OAuthError) when the record cannot be kept within AUDIT_WAIT seconds. A
        record still queued then may commit later: the trail can hold a success whose
        token was never delivered, never a token without its record."""
        if self.on_token is None:
            return
        try:
            await asyncio.wait_for(self.on_token(client_id, outcome, peer), AUDIT_WAIT)
        except (TimeoutError, StoreUnavailable):
            log.warning("token request not answered: its audit record could not be kept")
            raise unavailable("the request could not be recorded; try again later") from None

    async def issue(self, form: Mapping[str, str], endpoints: Endpoints,
                    peer: str) -> IssuedToken:
        """Answer a token request, or raise OAuthError; either way the hook hears of it."""
        named: list[str] = []
        try:
            issued = await self._issue(form, endpoints, named)
        except OAuthError as exc:
            log.info("token refused: %s (%s)", exc.error, exc.description)
            await self.record(named[0] if named else "", exc.error, peer)
            raise
        await self.record(named[0], "success", peer)
        return issued

    async def _issue(self, form: Mapping[str, str], endpoints: Endpoints,
                     named: list[str]) -> IssuedToken:
        grant_type = form.get("grant_type")
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
        if "client_secret" in form:
            raise OAuthError("invalid_client", "only private_key_jwt client authentication "
                                               "is supported", 401)
        assertion_type = form.get("client_assertion_type")
        assertion = form.get("client_assertion")
        if not assertion_type or not assertion:
            raise OAuthError("invalid_request",
                             "client_assertion_type and client_assertion are required")
        if assertion_type != JWT_BEARER:
            raise OAuthError("invalid_client", f"client_assertion_type must be {JWT_BEARER}",
                             401)
        client = await self._authenticate_client(assertion, endpoints, named)
        if form.get("client_id") not in (None, client.client_id):
            raise OAuthError("invalid_client", "client_id does not match the assertion", 401)
        requested = form.get("scope", "")
        if not requested.strip():
            # SMART Backend Services §Request: scope is required.
            raise OAuthError("invalid_request", "scope is required")
        granted = grant(requested, client.scopes)
        if not granted:
            raise OAuthError("invalid_scope", "none of the requested scopes may be granted")
        return self._mint(client, granted, endpoints)

    async def _authenticate_client(self, assertion: str, endpoints: Endpoints,
                                   named: list[str]) -> Client:
        try:
            _, unverified = read_unverified(assertion)
        except TokenError:
            raise OAuthError("invalid_client", "the client assertion is not a JWT", 401) from None
        iss = unverified.get("iss")
        client = self.clients.get(iss) if isinstance(iss, str) else None
        if client is None:
            raise OAuthError("invalid_client", "unknown client", 401)
        # Refusals are recorded against the registered client the assertion names.
        named.append(client.client_id)
        try:
            _, claims = verify_jwt(assertion, client.keys, allowed_algs=ASSERTION_ALGS)
            # RFC 7523 §3 / SMART: iss and sub are both the client_id; aud the token URL.
            if claims.get("sub") != client.client_id:
                raise TokenError("sub must equal iss")
            if not has_audience(claims, endpoints.token_url):
                raise TokenError("aud must be the token endpoint")
            # SMART Backend Services §Authenticating: exp no more than five minutes in the
            # future (measured from iat when the client states it, else from our clock).
            exp = check_times(claims, now=self.clock(), leeway=CLOCK_SKEW,
                              max_lifetime=MAX_ASSERTION_AHEAD)
            jti = claims.get("jti")
            if not isinstance(jti, str) or not JTI.fullmatch(jti):
                raise TokenError("jti is required")
            # Checked last, so only a verified assertion can occupy the cache; kept as long
            # as check_times would accept it (exp plus the skew).
            if not await self.replay.first_use(ReplayCache.key(client.client_id, jti),
                                               exp + CLOCK_SKEW):
                raise TokenError("assertion already used")
        except TokenError as exc:
            raise OAuthError("invalid_client", f"client assertion refused: {exc.reason}",
                             401) from None
        except StoreUnavailable:
            log.warning("token request not answered: the assertion id could not be kept")
            raise unavailable("the assertion could not be recorded; try again later") from None
        return client

    def _mint(self, client: Client, granted: Sequence[str],
              endpoints: Endpoints) -> IssuedToken:
        now = int(self.clock())
        scope = " ".join(granted)
        claims: dict[str, Any] = {
            "iss": endpoints.issuer, "aud": endpoints.audience, "sub": client.client_id,
            "client_id": client.client_id, "scope": scope, "iat": now, "nbf": now,
            "exp": now + self._lifetime, "jti": secrets.token_urlsafe(18)}
        if client.profile is not None:
            claims["profile"] = client.profile
        if client.patient is not None:
            # SMART launch context: the bare id, as in a token response's `patient`.
            claims["patient"] = client.patient.removeprefix("Patient/")
        token = sign_jwt(claims, self._key, ACCESS_TOKEN_ALG, self._kid, typ=ACCESS_TOKEN_TYPE)
        log.info("token issued: client %s, %d scopes", client.client_id, len(granted))
        return IssuedToken(token, self._lifetime, scope)

    def verify_access_token(self, token: str, endpoints: Endpoints) -> tuple[Principal, float]:
        """The principal one of our access tokens stands for, and its exp; TokenError else."""
        header, claims = verify_jwt(token, self._keyset, allowed_algs=(ACCESS_TOKEN_ALG,))
        if header.get("typ") != ACCESS_TOKEN_TYPE:
            raise TokenError("not an access token")
        if claims.get("iss") != endpoints.issuer:
            raise TokenError("wrong issuer")
        if not has_audience(claims, endpoints.audience):
            raise TokenError("wrong audience")
        # Our own token: our clock set its exp and our clock ends it, no skew allowed (skew
        # stays for nbf/iat, where another instance sharing the key may run a little ahead).
        exp = check_times(claims, now=self.clock(), leeway=CLOCK_SKEW, expiry_leeway=0)
        client_id, scope, jti = claims.get("client_id"), claims.get("scope"), claims.get("jti")
        if not isinstance(client_id, str) or not isinstance(scope, str):
            raise TokenError("malformed access token")
        if client_id not in self.clients:
            # A client removed from the configuration loses its tokens at once.
            raise TokenError("client no longer registered")
        try:
            scopes = ScopeSet.parse(scope)
        except ScopeError:
            raise TokenError("malformed access token") from None
        profile = claims.get("profile")
        principal = Principal(
            client_id, scopes, "smart", profile if isinstance(profile, str) else None,
            patient_reference(claims.get("patient")), jti if isinstance(jti, str) else "")
        return principal, exp

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(self._key.public_key(), self._kid, ACCESS_TOKEN_ALG)]}

    def smart_configuration(self, endpoints: Endpoints) -> dict[str, Any]:
        """SMART App Launch 2.x §Conformance: the .well-known/smart-configuration document."""
        scopes = sorted({s for c in self.clients.values() for s in grant(" ".join(c.scopes),
                                                                         c.scopes)})
        return {
            "issuer": endpoints.issuer,
            "jwks_uri": endpoints.jwks_uri,
            "token_endpoint": endpoints.token_url,
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": scopes,
            "code_challenge_methods_supported": [],
            "capabilities": ["client-confidential-asymmetric", "permission-v2",
                             "permission-v1"],
        }


AUTH_SERVER = web.AppKey("auth_server", AuthorizationServer)


routes = web.RouteTableDef()


@routes.post("/auth/token")
async def token_endpoint(request: web.Request) -> web.Response:
    server = request.config_dict[AUTH_SERVER]
    peer = request.remote or ""
    try:
        form = await _read_form(request)
    except OAuthError as exc:
        try:
            await server.record("", exc.error, peer)
        except OAuthError as unrecorded:
            return _oauth_error(unrecorded)
        return _oauth_error(exc)
    try:
        issued = await server.issue(form, server.endpoints(request), peer)
    except OAuthError as exc:
        return _oauth_error(exc)
    return web.json_response(issued.as_json(), headers=_NO_STORE)


@routes.get("/.well-known/smart-configuration")
async def smart_configuration(request: web.Request) -> web.Response:
    server = request.config_dict[AUTH_SERVER]
    return web.json_response(server.smart_configuration(server.endpoints(request)))


@routes.get("/auth/jwks")
async def jwks(request: web.Request) -> web.Response:
    return web.json_response(request.config_dict[AUTH_SERVER].jwks())


async def _read_form(request: web.Request) -> dict[str, str]:
    # RFC 6749 §4.4.2: application/x-www-form-urlencoded; §3.2: no parameter twice.
    if request.content_type != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    body = b""
    while chunk := await request.content.read(MAX_FORM_BYTES + 1 - len(body)):
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise OAuthError("invalid_request", "the request body is too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                          max_num_fields=MAX_FORM_FIELDS, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the body is not a valid form") from None
    form = dict(pairs)
    if len(form) != len(pairs):
        raise OAuthError("invalid_request", "a parameter is given more than once")
    return form


def _oauth_error(exc: OAuthError) -> web.Response:
    headers = dict(_NO_STORE)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return web.json_response({"error": exc.error, "error_description": exc.description},
                             status=exc.status, headers=headers)


def load_signing_key(path: Path | None, data_dir: Path) -> ec.EllipticCurvePrivateKey:
    """Our token signing key: the configured PEM, or <data_dir>/keys/token-signing.pem."""
    if path is None:
        path = data_dir / KEYS_DIR / SIGNING_KEY_FILE
        _create_signing_key(path)
    try:
        mode = path.stat().st_mode
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AuthSetupError(f"auth.signing_key_file {path}: not a readable, unencrypted "
                             f"PEM private key ({type(exc).__name__})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token signing key %s is readable by group or others (mode %o); "
                    "chmod 600 it", path, stat.S_IMODE(mode))
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve,
                                                                        ec.SECP384R1):
        raise AuthSetupError(f"auth.signing_key_file {path}: must be an EC P-384 key (ES384)")
    return key


def _create_signing_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # O_EXCL: never overwrite; another instance sharing the directory may win the race.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    log.info("generated the token signing key %s", path)
