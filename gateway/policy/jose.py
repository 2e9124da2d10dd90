"""Minimal JWS compact serialisation (JWT) over `cryptography`: asymmetric algorithms only.

Deliberately small: the header's alg must be allow-listed and fit the key's type and curve,
keys come only from our own key sets (never from the token), and every refusal is one
`TokenError` whose reason is a fixed phrase that never repeats token content.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

# TokenError: defined in errors.py; imported here too for the old import path.
from gateway.policy.errors import TokenError as TokenError

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

MAX_TOKEN_CHARS = 16 * 1024
MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class _Alg:
    family: Literal["RS", "PS", "ES"]
    hash: type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]
    curve: type[ec.EllipticCurve] | None = None
    coordinate_bytes: int = 0


# RFC 7518 §3.1: the JWS algorithms we implement; HS* and none are absent on purpose, so a
# symmetric or unsigned token can never verify (no algorithm-confusion path exists).
_ALGS: dict[str, _Alg] = {
    "RS256": _Alg("RS", hashes.SHA256),
    "RS384": _Alg("RS", hashes.SHA384),
    "RS512": _Alg("RS", hashes.SHA512),
    "PS256": _Alg("PS", hashes.SHA256),
    "PS384": _Alg("PS", hashes.SHA384),
    "PS512": _Alg("PS", hashes.SHA512),
    "ES256": _Alg("ES", hashes.SHA256, ec.SECP256R1, 32),
    "ES384": _Alg("ES", hashes.SHA384, ec.SECP384R1, 48),
    "ES512": _Alg("ES", hashes.SHA512, ec.SECP521R1, 66),
}
SUPPORTED_ALGS = frozenset(_ALGS)

# RFC 7515 §4.1: headers that name or carry a key, or change processing; a key from the
# token itself is never trusted, and we implement no critical extensions (§4.1.11).
_REFUSED_HEADERS = frozenset({"crit", "jku", "jwk", "x5u", "x5c", "zip"})
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
_CURVE_NAMES = {curve.name: crv for crv, curve in _CURVES.items()}


@dataclass(frozen=True, slots=True)
class Jwk:
    """One verification key with its optional kid and alg (RFC 7517 §4.4, §4.5)."""

    key: PublicKey
    kid: str | None = None
    alg: str | None = None

    def fits(self, alg: str) -> bool:
        """Whether a token signed with `alg` may be verified with this key."""
        spec = _ALGS.get(alg)
        if spec is None or (self.alg is not None and self.alg != alg):
            return False
        if spec.family == "ES":
            return (isinstance(self.key, ec.EllipticCurvePublicKey)
                    and spec.curve is not None and isinstance(self.key.curve, spec.curve))
        return isinstance(self.key, rsa.RSAPublicKey) and self.key.key_size >= MIN_RSA_BITS


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys one party may sign with (a JWKS, or a single PEM key)."""

    keys: tuple[Jwk, ...]

    @classmethod
    def of(cls, key: PublicKey, kid: str | None = None, alg: str | None = None) -> KeySet:
        return cls((Jwk(_checked(key), kid, alg),))

    def __iter__(self) -> Iterator[Jwk]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def candidates(self, alg: str, kid: str | None) -> list[Jwk]:
        """The keys to try for a token header; refuses unknown kids and ambiguity.

        A set of exactly one key that has no kid of its own (a single PEM key) is tried
        whatever kid the header names: RFC 7515 §4.1.4 makes kid a hint, and SMART
        Backend Services requires clients to send one even when we were given no JWKS."""
        named = [k for k in self.keys if k.kid == kid] if kid is not None else list(self.keys)
        if kid is not None and not named and len(self.keys) == 1 and self.keys[0].kid is None:
            named = list(self.keys)
        if kid is not None and not named:
            raise TokenError("unknown key id")
        fitting = [k for k in named if k.fits(alg)]
        if not fitting:
            raise TokenError("algorithm does not match the key")
        if kid is None and len(fitting) != 1:
            raise TokenError("token names no key id")
        return fitting


# -- keys ---------------------------------------------------------------------------------


def load_jwks(source: Path | str | Mapping[str, Any]) -> KeySet:
    """A key set from a JWKS file or mapping; symmetric and encryption keys are skipped."""
    where = "JWKS"
    if isinstance(source, Mapping):
        document: Any = source
    else:
        where = str(source)
        try:
            document = json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where}: not a readable JSON key set ({exc})") from None
    entries = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(entries, list):
        raise ValueError(f"{where}: a JWKS needs a 'keys' array (RFC 7517 §5)")
    keys: list[Jwk] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: keys[{index}] is not an object")
        # RFC 7517 §4.2/4.3: only signature-verification keys; 'oct' and OKP are ignored.
        if entry.get("use", "sig") != "sig" or entry.get("kty") not in ("RSA", "EC"):
            continue
        ops = entry.get("key_ops")
        if isinstance(ops, list) and "verify" not in ops:
            continue
        try:
            key = _jwk_public_key(entry)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"{where}: keys[{index}]: {exc}") from None
        kid, alg = entry.get("kid"), entry.get("alg")
        if (kid is not None and not isinstance(kid, str)) or (
                alg is not None and alg not in _ALGS):
            raise ValueError(f"{where}: keys[{index}]: unsupported kid or alg")
        keys.append(Jwk(key, kid, alg))
    if not keys:
        raise ValueError(f"{where}: no RSA or EC signature keys")
    return KeySet(tuple(keys))


def public_key_from_pem(pem: bytes | str) -> PublicKey:
    """An RSA (>= 2048 bits) or EC public key from a PEM public key or certificate."""
    data = pem.encode() if isinstance(pem, str) else pem
    if b"BEGIN CERTIFICATE" in data:
        key: object = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("only RSA and EC public keys are supported")
    return _checked(key)


def public_jwk(key: PublicKey, kid: str | None = None, alg: str | None = None) -> dict[str, str]:
    """The public JWK of a key (RFC 7517/7518 §6), with kid, alg and use=sig when given."""
    jwk = _thumbprint_members(key)
    extra = {"kid": kid, "alg": alg, "use": "sig"}
    jwk.update({k: v for k, v in extra.items() if v is not None})
    return jwk


def thumbprint(key: PublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): required members, sorted, no spaces."""
    members = json.dumps(_thumbprint_members(key), sort_keys=True, separators=(",", ":"))
    return _b64encode(hashlib.sha256(members.encode()).digest())


def _thumbprint_members(key: PublicKey) -> dict[str, str]:
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return {"kty": "RSA", "n": _b64int(numbers.n), "e": _b64int(numbers.e)}
    crv = _CURVE_NAMES.get(key.curve.name)
    if crv is None:
        raise ValueError("unsupported curve")
    size = (key.curve.key_size + 7) // 8
    point = key.public_numbers()
    return {"kty": "EC", "crv": crv, "x": _b64int(point.x, size), "y": _b64int(point.y, size)}


def _jwk_public_key(entry: Mapping[str, Any]) -> PublicKey:
    if entry["kty"] == "RSA":
        n, e = _b64uint(entry.get("n")), _b64uint(entry.get("e"))
        return _checked(rsa.RSAPublicNumbers(e, n).public_key())
    curve = _CURVES.get(entry.get("crv", ""))
    if curve is None:
        raise ValueError("unsupported curve (P-256, P-384, P-521)")
    size = (curve.key_size + 7) // 8
    x, y = _b64decode_member(entry.get("x")), _b64decode_member(entry.get("y"))
    # RFC 7518 §6.2.1.2: coordinates are the full field size.
    if len(x) != size or len(y) != size:
        raise ValueError("EC coordinates of the wrong length")
    # Raises ValueError for a point not on the curve.
    return ec.EllipticCurvePublicNumbers(
        int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve).public_key()


def _checked(key: PublicKey) -> PublicKey:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits")
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in _CURVE_NAMES:
        raise ValueError("unsupported curve (P-256, P-384, P-521)")
    return key


# -- tokens -------------------------------------------------------------------------------


def sign_jwt(claims: Mapping[str, Any], private_key: PrivateKey, alg: str,
             kid: str | None = None, *, typ: str | None = "JWT") -> str:
    """A compact JWS of `claims`; ES signatures in the raw r||s form (RFC 7518 §3.4)."""
    spec = _ALGS.get(alg)
    if spec is None or not Jwk(private_key.public_key()).fits(alg):
        raise ValueError("algorithm does not match the key")
    header: dict[str, str] = {"alg": alg}
    if kid is not None:
        header["kid"] = kid
    if typ is not None:
        header["typ"] = typ
    signing_input = f"{_b64json(header)}.{_b64json(claims)}".encode("ascii")
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(private_key.sign(signing_input, ec.ECDSA(spec.hash())))
        signature = r.to_bytes(spec.coordinate_bytes, "big") + s.to_bytes(
            spec.coordinate_bytes, "big")
    else:
        signature = private_key.sign(signing_input, _rsa_padding(spec), spec.hash())
    return f"{signing_input.decode('ascii')}.{_b64encode(signature)}"


def read_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims WITHOUT checking the signature: only to pick the key set to use."""
    header_b64, payload_b64, _ = _split(token)
    return _json_object(header_b64), _json_object(payload_b64)


def verify_jwt(token: str, keys: KeySet, *,
               allowed_algs: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the signature with a key from `keys`; the claims' meaning is the caller's."""
    header_b64, payload_b64, signature_b64 = _split(token)
    header = _json_object(header_b64)
    alg = header.get("alg")
    # RFC 8725 §3.1: the allow-list decides, never the header; 'none' and HS* are not in
    # _ALGS, so they fail here whatever the caller passes.
    if not isinstance(alg, str) or alg not in _ALGS or alg not in set(allowed_algs):
        raise TokenError("algorithm not allowed")
    if _REFUSED_HEADERS & header.keys():
        raise TokenError("header parameter not allowed")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenError("unknown key id")
    signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
    signature = _b64decode(signature_b64)
    if not any(_verifies(jwk.key, alg, signing_input, signature)
               for jwk in keys.candidates(alg, kid)):
        raise TokenError("bad signature")
    return header, _json_object(payload_b64)


def _verifies(key: PublicKey, alg: str, signing_input: bytes, signature: bytes) -> bool:
    spec = _ALGS[alg]
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            size = spec.coordinate_bytes
            if len(signature) != 2 * size:
                return False
            der = encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                       int.from_bytes(signature[size:], "big"))
            key.verify(der, signing_input, ec.ECDSA(spec.hash()))
        else:
            key.verify(signature, signing_input, _rsa_padding(spec), spec.hash())
    except InvalidSignature:
        return False
    return True


def _rsa_padding(spec: _Alg) -> padding.AsymmetricPadding:
    if spec.family == "PS":
        # RFC 7518 §3.5: MGF1 with the same hash, salt as long as the hash output.
        return padding.PSS(mgf=padding.MGF1(spec.hash()), salt_length=spec.hash.digest_size)
    return padding.PKCS1v15()


def _split(token: str) -> tuple[str, str, str]:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise TokenError("token too large")
    parts = token.split(".")
    # An empty signature is let through to be refused by the alg check ('none') or verify.
    if len(parts) != 3 or not all(_B64URL.fullmatch(part) for part in parts[:2]) or (
            parts[2] and not _B64URL.fullmatch(parts[2])):
        raise TokenError("not a compact JWS")
    return parts[0], parts[1], parts[2]


def _json_object(part: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(part), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError):
        raise TokenError("not a compact JWS") from None
    if not isinstance(value, dict):
        raise TokenError("not a compact JWS")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7515 §5.2 / RFC 7519 §4: duplicate member names are refused, not last-one-wins.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member")
    return result


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    # RFC 7515 §2: base64url without padding; '=' and non-alphabet characters never reach
    # here (_B64URL), and a length of 1 mod 4 cannot be valid.
    if len(text) % 4 == 1:
        raise TokenError("not a compact JWS")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64json(value: Mapping[str, Any]) -> str:
    return _b64encode(json.dumps(value, separators=(",", ":")).encode())


def _b64int(value: int, size: int | None = None) -> str:
    length = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    return _b64encode(value.to_bytes(length, "big"))


def _b64decode_member(value: object) -> bytes:
    if not isinstance(value, str) or not _B64URL.fullmatch(value) or len(value) % 4 == 1:
        raise ValueError("a key member is not base64url")
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _b64uint(value: object) -> int:
    return int.from_bytes(_b64decode_member(value), "big")


# -- registered claims --------------------------------------------------------------------


def check_times(claims: Mapping[str, Any], *, now: float, leeway: float = 30.0,
                expiry_leeway: float | None = None, max_lifetime: float | None = None
                ) -> float:
    """Check exp (required), nbf and iat (RFC 7519 §4.1.4-6); the exp.

    `leeway` is the clock skew allowed for nbf and iat, and for exp unless
    `expiry_leeway` says otherwise (0 for tokens we signed ourselves: our clock decides
    when they end). `max_lifetime` bounds exp: at most that long after iat when the token
    states iat (skew-free, the issuer's own clock on both sides), else after `now`."""
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise TokenError("no expiry")
    if exp <= now - (leeway if expiry_leeway is None else expiry_leeway):
        raise TokenError("expired")
    times: dict[str, float] = {}
    for name, reason in (("nbf", "not yet valid"), ("iat", "issued in the future")):
        value = claims.get(name)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TokenError(f"malformed {name}")
        if value > now + leeway:
            raise TokenError(reason)
        times[name] = float(value)
    if max_lifetime is not None and exp > times.get("iat", now) + max_lifetime:
        raise TokenError("expiry too far ahead")
    return float(exp)


def has_audience(claims: Mapping[str, Any], audience: str) -> bool:
    """Whether `aud` (a string or an array, RFC 7519 §4.1.3) names `audience`."""
    aud = claims.get("aud")
    if isinstance(aud, str):
        return aud == audience
    return isinstance(aud, list) and audience in aud and all(isinstance(a, str) for a in aud)
