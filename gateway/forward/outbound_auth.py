"""Outbound credentials: what the gateway presents to a backend.

Nothing, a static API key header, an OAuth2 client-credentials token (RFC 6749 §4.4, the
secret as HTTP Basic or in the form, §2.3.1), or a SMART Backend Services token (a
client assertion JWT signed RS384/ES384, RFC 7523 and the SMART App Launch "Backend
Services" page). Tokens are cached until shortly before they expire and refreshed by one
request at a time, however many calls wait for them. Every error names a status or an
OAuth error code, never a secret or a response body.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote_plus

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# TokenUnavailable is defined in errors.py; imported here too for the old import path.
from gateway.forward.errors import TokenUnavailable as TokenUnavailable
from gateway.policy.jose import MIN_RSA_BITS, PrivateKey, sign_jwt

log = logging.getLogger(__name__)

AuthKind = Literal["none", "client-credentials", "smart-backend", "api-key"]
SecretMethod = Literal["client_secret_basic", "client_secret_post"]

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services: the assertion's exp is no more than five minutes ahead.
ASSERTION_LIFETIME = 300
# A token response without expires_in (RFC 6749 §5.1 only recommends it): assume this.
DEFAULT_LIFETIME = 300.0
# RFC 6749 §5.2 error codes are ASCII words; anything else is not repeated.
_ERROR_CODE = re.compile(r"[a-z_]{1,40}")


@dataclass(frozen=True)
class AuthSpec:
    """How to authenticate to one backend: a plain mirror of the operator's config."""

    kind: AuthKind = "none"
    client_id: str = ""
    client_secret: str | None = field(default=None, repr=False)
    method: SecretMethod = "client_secret_basic"
    private_key_file: Path | None = None
    # smart-backend: RS384 for an RSA key, ES384 for a P-384 key; None: from the key.
    algorithm: Literal["RS384", "ES384"] | None = None
    key_id: str = ""
    token_url: str = ""
    scopes: str = ""
    refresh_margin: float = 60.0  # refresh this many seconds before expiry
    header: str = "X-API-Key"
    key: str | None = field(default=None, repr=False)


class OutboundAuth(Protocol):
    """Headers that authenticate one request; `invalidate` after the backend said 401."""

    refreshes: int  # token requests made (0 for credentials that never change)

    async def headers(self) -> dict[str, str]:
        """The headers to add; may fetch a token (TokenUnavailable if none can be had)."""
        ...

    def invalidate(self, token_header: str) -> None:
        """The Authorization value a 401 answered: forget that token (once per token)."""
        ...


class NoAuth:
    """A backend that takes requests without credentials (a test server, a private net)."""

    refreshes = 0

    async def headers(self) -> dict[str, str]:
        return {}

    def invalidate(self, token_header: str) -> None:
        return None


class ApiKeyAuth:
    """A static key in a header of the backend's choosing."""

    refreshes = 0

    def __init__(self, header: str, key: str) -> None:
        self._headers = {header: key}

    async def headers(self) -> dict[str, str]:
        return dict(self._headers)

    def invalidate(self, token_header: str) -> None:
        return None  # a static key cannot be refreshed: a 401 is passed on


class _TokenAuth:
    """A bearer token cache: reused until `margin` before expiry, one refresh in flight."""

    def __init__(self, session: aiohttp.ClientSession, token_url: str, scopes: str,
                 refresh_margin: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        self._token_url = token_url
        self._scopes = scopes
        self._refresh_margin = refresh_margin
        self._clock = clock
        self._authorization: str | None = None
        self._refresh_at = 0.0
        self._pending: asyncio.Future[str] | None = None
        self.refreshes = 0

    async def headers(self) -> dict[str, str]:
        authorization = self._authorization
        if authorization is None or self._clock() >= self._refresh_at:
            authorization = await self._refreshed()
        return {"Authorization": authorization}

    def invalidate(self, token_header: str) -> None:
        if self._authorization is not None and token_header == self._authorization:
            self._authorization = None
            self._refresh_at = 0.0

    async def _refreshed(self) -> str:
        # Everyone who finds the token stale waits on the same request; shielded, so one
        # caller's cancellation does not fail the others.
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._fetch())
            self._pending.add_done_callback(self._settled)
        return await asyncio.shield(self._pending)

    def _settled(self, future: asyncio.Future[str]) -> None:
        self._pending = None
        if not future.cancelled():
            future.exception()  # retrieved: waiters saw it, nobody else needs a warning

    async def _fetch(self) -> str:
        self.refreshes += 1
        started = self._clock()
        form, headers = self._grant()
        if self._scopes:
            form["scope"] = self._scopes
        try:
            async with self._session.post(self._token_url, data=form, headers=headers,
                                          allow_redirects=False) as response:
                status = response.status
                payload = await _json_or_none(response)
        except TimeoutError:
            raise TokenUnavailable("token endpoint did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise TokenUnavailable(f"token endpoint unreachable ({type(exc).__name__})") \
                from None
        if status != 200:
            code = payload.get("error") if isinstance(payload, dict) else None
            reason = f"HTTP {status}"
            if isinstance(code, str) and _ERROR_CODE.fullmatch(code):
                reason += f" {code}"
            raise TokenUnavailable(f"token request refused: {reason}")
        token, lifetime = _token_of(payload)
        margin = min(self._refresh_margin, lifetime / 2)
        authorization = f"Bearer {token}"
        self._authorization = authorization
        self._refresh_at = started + lifetime - margin
        return authorization

    def _grant(self) -> tuple[dict[str, str], dict[str, str]]:
        raise NotImplementedError


class ClientCredentials(_TokenAuth):
    """RFC 6749 §4.4 client credentials with a shared secret (§2.3.1 Basic or form)."""

    def __init__(self, session: aiohttp.ClientSession, spec: AuthSpec,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(session, spec.token_url, spec.scopes, spec.refresh_margin, clock)
        self._client_id = spec.client_id
        self._secret = spec.client_secret or ""
        self._method = spec.method

    def _grant(self) -> tuple[dict[str, str], dict[str, str]]:
        form = {"grant_type": "client_credentials"}
        if self._method == "client_secret_post":
            form.update(client_id=self._client_id, client_secret=self._secret)
            return form, {}
        # RFC 6749 §2.3.1: both parts form-urlencoded before the Basic encoding.
        pair = f"{quote_plus(self._client_id)}:{quote_plus(self._secret)}"
        basic = base64.b64encode(pair.encode()).decode("ascii")
        return form, {"Authorization": f"Basic {basic}"}


class SmartBackend(_TokenAuth):
    """SMART Backend Services: client_credentials with a signed client assertion."""

    def __init__(self, session: aiohttp.ClientSession, spec: AuthSpec, private_key: PrivateKey,
                 algorithm: str, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        super().__init__(session, spec.token_url, spec.scopes, spec.refresh_margin, clock)
        self._client_id = spec.client_id
        self._key = private_key
        self._algorithm = algorithm
        self._key_id = spec.key_id or None
        self._wall_clock = wall_clock

    def assertion(self) -> str:
        """A fresh client assertion: iss = sub = client_id, aud = the token URL, a unique
        jti, exp five minutes ahead."""
        claims = {"iss": self._client_id, "sub": self._client_id, "aud": self._token_url,
                  "exp": int(self._wall_clock()) + ASSERTION_LIFETIME,
                  "jti": secrets.token_urlsafe(24)}
        return sign_jwt(claims, self._key, self._algorithm, self._key_id)

    def _grant(self) -> tuple[dict[str, str], dict[str, str]]:
        return {"grant_type": "client_credentials", "client_assertion_type": JWT_BEARER,
                "client_assertion": self.assertion()}, {}


async def _json_or_none(response: aiohttp.ClientResponse) -> Any:
    try:
        return await response.json(content_type=None)
    except (ValueError, UnicodeDecodeError, aiohttp.ClientPayloadError):
        return None


def _token_of(payload: Any) -> tuple[str, float]:
    """The access token and its lifetime in seconds from a token response (RFC 6749 §5.1)."""
    if not isinstance(payload, dict):
        raise TokenUnavailable("token response is not a JSON object")
    token = payload.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenUnavailable("token response has no access_token")
    token_type = payload.get("token_type", "bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenUnavailable("token response is not a bearer token")
    lifetime = payload.get("expires_in", DEFAULT_LIFETIME)
    if isinstance(lifetime, str) and lifetime.isdigit():
        lifetime = float(lifetime)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
        raise TokenUnavailable("token response has an unusable expires_in")
    return token, float(lifetime)


def load_private_key(path: Path, algorithm: str | None) -> tuple[PrivateKey, str]:
    """The PEM private key at `path` and the algorithm it signs with (RS384 for RSA,
    ES384 for P-384). ValueError names the file, never its content."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the private key ({exc.strerror})") from None
    except (ValueError, TypeError):
        raise ValueError(f"{path}: not an unencrypted PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"{path}: an RSA key needs at least {MIN_RSA_BITS} bits")
        fits = "RS384"
    elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        fits = "ES384"
    else:
        raise ValueError(f"{path}: SMART backend keys are RSA (RS384) or EC P-384 (ES384)")
    if algorithm is not None and algorithm != fits:
        raise ValueError(f"{path}: the key signs {fits}, not {algorithm}")
    return key, fits


def build_auth(spec: AuthSpec, session: aiohttp.ClientSession) -> OutboundAuth:
    """The credentials for `spec`, token requests going through `session`."""
    if spec.kind == "none":
        return NoAuth()
    if spec.kind == "api-key":
        if not spec.key:
            raise ValueError("api-key auth needs a key")
        return ApiKeyAuth(spec.header, spec.key)
    if not spec.token_url or not spec.client_id:
        raise ValueError(f"{spec.kind} auth needs client_id and token_url")
    if spec.kind == "client-credentials":
        if not spec.client_secret:
            raise ValueError("client-credentials auth needs client_secret")
        return ClientCredentials(session, spec)
    if spec.private_key_file is None:
        raise ValueError("smart-backend auth needs private_key_file")
    key, algorithm = load_private_key(spec.private_key_file, spec.algorithm)
    return SmartBackend(session, spec, key, algorithm)
