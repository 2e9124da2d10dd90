"""Who is calling each protected route: `principal_for(request)` accepts our own access
tokens (issued by `auth_server`), tokens of configured external issuers, static API keys,
and, only when configured, anonymous callers; anything else is an AuthError (401/403 with
its WWW-Authenticate challenge).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiohttp import web

from gateway.edge import auth_server
from gateway.edge.auth_server import (
    CLOCK_SKEW,
    JTI,
    AuthorizationServer,
    AuthSetupError,
    Endpoints,
)
from gateway.edge.errors import AuthError as AuthError  # defined with the edge's root
from gateway.policy.jose import (
    SUPPORTED_ALGS,
    KeySet,
    TokenError,
    check_times,
    has_audience,
    read_unverified,
    verify_jwt,
)
from gateway.policy.principal import Principal, patient_reference
from gateway.policy.scopes import ScopeError, ScopeSet, grant

log = logging.getLogger(__name__)

REALM = "isthmus"
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,128}")
_NO_ENDPOINTS = Endpoints("", "", "", "")


@dataclass(frozen=True, slots=True)
class ExternalIssuer:
    """An authorization server whose access tokens we accept, cut to `allowed_scopes`."""

    issuer: str
    keys: KeySet
    audience: str
    client_claim: str = "client_id"
    allowed_scopes: tuple[str, ...] = ("system/*.rs",)
    profile: str | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A static API key, known only by its SHA-256."""

    name: str
    sha256: bytes
    scopes: ScopeSet
    profile: str | None = None


class Authenticator:
    """Turns a request's credentials into a Principal, or raises AuthError."""

    def __init__(self, server: AuthorizationServer, *, issuers: Iterable[ExternalIssuer] = (),
                 api_keys: Iterable[ApiKey] = (), anonymous: ScopeSet | None = None,
                 cache_size: int = 10_000) -> None:
        self.server = server
        self.issuers = {i.issuer: i for i in issuers}
        self.api_keys = tuple(api_keys)
        self.anonymous = anonymous
        self._cache_size = cache_size
        # Verified bearer tokens, so the hot path skips signature checks; entries end with
        # the token and the least recently used go first when full.
        self._cache: OrderedDict[tuple[str, str, str], tuple[Principal, float]] = OrderedDict()

    async def authenticate(self, request: web.BaseRequest) -> Principal:
        authorization = request.headers.get("Authorization")
        # Our URLs matter only to a bearer token (its issuer and audience).
        endpoints = (self.server.endpoints(request) if authorization is not None
                     else _NO_ENDPOINTS)
        return self.authenticate_headers(authorization, request.headers.get("X-API-Key"),
                                         endpoints)

    def authenticate_headers(self, authorization: str | None, api_key: str | None,
                             endpoints: Endpoints) -> Principal:
        """The principal for these headers (RFC 6750 §2.1 Bearer, ApiKey, X-API-Key)."""
        if authorization is not None and api_key is not None:
            raise AuthError(401, "give one credential, not two", self._challenge("invalid_request"))
        if authorization is None and api_key is None:
            if self.anonymous is not None:
                return Principal("anonymous", self.anonymous, "anonymous")
            raise AuthError(401, "credentials are required", self._challenge())
        if api_key is not None:
            return self._api_key(api_key.strip())
        scheme, _, credential = (authorization or "").strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() == "bearer" and credential:
            return self._bearer(credential, endpoints)
        if scheme.lower() == "apikey" and credential:
            return self._api_key(credential)
        raise AuthError(401, "unsupported authorization scheme", self._challenge("invalid_request"))

    def _bearer(self, token: str, endpoints: Endpoints) -> Principal:
        now = self.server.clock()
        key = (token, endpoints.issuer, endpoints.audience)
        hit = self._cache.get(key)
        if hit is not None:
            principal, valid_until = hit
            if now < valid_until:
                self._cache.move_to_end(key)
                return principal
            del self._cache[key]
        try:
            principal, exp = self._verify(token, endpoints)
        except TokenError as exc:
            log.info("bearer token refused: %s", exc.reason)
            raise AuthError(401, exc.reason, self._challenge("invalid_token", exc.reason)) from None
        # Cached no longer than the verification would accept it: to exp for our own
        # tokens, exp plus the skew for an external issuer's.
        self._cache[key] = (principal, exp)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str, endpoints: Endpoints) -> tuple[Principal, float]:
        """The principal and the instant from which the token is no longer accepted."""
        _, unverified = read_unverified(token)
        iss = unverified.get("iss")
        if iss == endpoints.issuer:
            return self.server.verify_access_token(token, endpoints)
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise TokenError("unknown issuer")
        _, claims = verify_jwt(token, issuer.keys, allowed_algs=SUPPORTED_ALGS)
        if not has_audience(claims, issuer.audience):
            raise TokenError("wrong audience")
        exp = check_times(claims, now=self.server.clock(), leeway=CLOCK_SKEW) + CLOCK_SKEW
        client_id = next((v for v in (claims.get(n) for n in (
            issuer.client_claim, "client_id", "azp", "sub"))
            if isinstance(v, str) and _CLIENT_ID.fullmatch(v)), None)
        if client_id is None:
            raise TokenError("no client id")
        scope = claims.get("scope")
        if isinstance(claims.get("scp"), list) and scope is None:
            scope = " ".join(s for s in claims["scp"] if isinstance(s, str))
        # The issuer's grant is cut to what this gateway lets that issuer grant.
        granted = grant(scope if isinstance(scope, str) else "", issuer.allowed_scopes)
        if not granted:
            raise AuthError(403, "no usable scopes",
                            self._challenge("insufficient_scope", "no usable scopes"))
        jti = claims.get("jti")
        principal = Principal(client_id, ScopeSet.parse(granted), "issuer", issuer.profile,
                              patient_reference(claims.get("patient")),
                              jti if isinstance(jti, str) and JTI.fullmatch(jti) else "")
        return principal, exp

    def _api_key(self, key: str) -> Principal:
        presented = hashlib.sha256(key.encode()).digest()
        found = None
        for candidate in self.api_keys:  # every key compared: the time says nothing
            if hmac.compare_digest(presented, candidate.sha256):
                found = candidate
        if found is None:
            raise AuthError(401, "unknown API key",
                            f'ApiKey realm="{REALM}", error="invalid_token"')
        return Principal(found.name, found.scopes, "api-key", found.profile)

    def _challenge(self, error: str | None = None, description: str | None = None) -> str:
        # RFC 6750 §3: no error code when the request carried no credentials.
        challenge = f'Bearer realm="{REALM}"'
        if error is not None:
            challenge += f', error="{error}"'
        if description is not None:
            challenge += f', error_description="{description}"'
        if self.api_keys and error is None:
            challenge += f', ApiKey realm="{REALM}"'
        return challenge


# -- wiring ---------------------------------------------------------------------------------


AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
# The caller, once authenticated: who a later refusal (403) is recorded against.
PRINCIPAL = web.RequestKey("principal", Principal)


async def principal_for(request: web.Request) -> Principal:
    """The caller of a protected route; raises AuthError (answer its status and headers)."""
    principal = await request.app[AUTHENTICATOR].authenticate(request)
    request[PRINCIPAL] = principal
    return principal


def install_auth(app: web.Application, server: AuthorizationServer,
                 authenticator: Authenticator) -> None:
    """Put the authorization server and authenticator on the app; add the routes."""
    app[auth_server.AUTH_SERVER] = server
    app[AUTHENTICATOR] = authenticator
    app.add_routes(auth_server.routes)


def checked_scopes(scopes: Sequence[str], where: str) -> ScopeSet:
    """Configured scopes parsed, or AuthSetupError naming the setting."""
    try:
        return ScopeSet.parse(scopes)
    except ScopeError as exc:
        raise AuthSetupError(f"{where}: {exc}") from None
