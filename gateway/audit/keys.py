"""Audit keys: AES-256 data keys for PHI, the Ed25519 key that signs checkpoints.

Data keys form a ring: every key decrypts, the newest (last listed) encrypts. Each record
names the key id it was sealed with, so a key is rotated by adding a new one; an old key
must stay in the ring while records sealed with it are retained. From each data key two
subkeys are derived (HKDF-SHA256): one encrypts, one computes the blind indexes that let a
reviewer search by patient without the patient reference being stored in plain text.

The signing key signs checkpoints and exports; a MAC key derived from it seals each
record, so only the key holder can extend the chain unnoticed. Reviewers verify with the
public key alone.

Formats. A data key file holds one key a line, `<id> <base64 of 32 bytes>`, oldest first,
`#` comments allowed; the same entries may come from the environment as
`id:base64,id:base64`. The signing key is a PKCS#8 PEM file, or 32 raw bytes in base64.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# AuditKeyError: defined in errors.py; imported here too for the old import path.
from gateway.audit.errors import AuditKeyError as AuditKeyError
from gateway.store.data_dir import read_key_text

log = logging.getLogger(__name__)

DATA_KEY_FILE = "audit-data.keys"
SIGNING_KEY_FILE = "audit-signing.pem"
PUBLIC_KEY_FILE = "audit-signing.pub.pem"

_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,40}")
_FILE_HEADER = """\
# Isthmus audit data keys (AES-256), one a line: <key id> <base64 of 32 random bytes>.
# Oldest first; the last key encrypts new records and every key listed decrypts.
# Never remove a key while audit records sealed with it are still retained.
"""


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"isthmus-audit-" + purpose).derive(secret)


_TAGS_KEPT = 8192


@dataclass(frozen=True)
class DataKey:
    """One AES-256 data key and the subkeys derived from it."""

    id: str
    cipher: AESGCM = field(repr=False)
    index_key: bytes = field(repr=False)
    # Associated data of every PHI envelope: binds the ciphertext to its key id.
    aad: bytes = b""
    _index: Any = field(default=None, repr=False)
    # Tags already computed: an MLLP sender's and a FHIR client's records name the same
    # patients again and again (two tags a record). Bounded; emptied when full.
    _tags: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_secret(cls, key_id: str, secret: bytes) -> DataKey:
        if not _KEY_ID.fullmatch(key_id):
            raise AuditKeyError(f"audit data key id '{key_id[:40]}' may hold only letters, "
                                "digits, '.', '_' and '-' (1-40 characters)")
        if len(secret) != 32:
            raise AuditKeyError(f"audit data key '{key_id}' is not 32 bytes (AES-256)")
        index_key = _derive(secret, b"index-v1")
        return cls(key_id, AESGCM(_derive(secret, b"phi-v1")), index_key,
                   b"isthmus-audit-phi-v1:" + key_id.encode(),
                   hashlib.blake2b(key=index_key, digest_size=16))

    def blind_index(self, text: str) -> bytes:
        """A keyed, deterministic tag of a value (BLAKE2b MAC): equal values, equal tags."""
        tags = self._tags
        digest = tags.get(text)
        if digest is None:
            tag = self._index.copy()
            tag.update(text.encode())
            digest = tag.digest()
            if len(tags) >= _TAGS_KEPT:
                tags.clear()
            tags[text] = digest
        return digest


@dataclass(frozen=True)
class KeyRing:
    """Data keys, oldest first: the last encrypts, all decrypt."""

    keys: tuple[DataKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise AuditKeyError("no audit data keys")
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise AuditKeyError("audit data key ids must be unique")

    @property
    def current(self) -> DataKey:
        return self.keys[-1]

    def get(self, key_id: str) -> DataKey | None:
        for key in self.keys:
            if key.id == key_id:
                return key
        return None


@dataclass(frozen=True)
class SigningKey:
    """The Ed25519 key that signs checkpoints and exports, and the MAC key derived from it."""

    private: Ed25519PrivateKey = field(repr=False)
    id: str
    mac_key: bytes = field(repr=False)

    @classmethod
    def from_private(cls, private: Ed25519PrivateKey) -> SigningKey:
        raw = private.private_bytes(serialization.Encoding.Raw,
                                    serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        return cls(private, key_id(private.public_key()), _derive(raw, b"chain-mac-v1"))

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


@dataclass(frozen=True)
class AuditKeys:
    """Everything the audit log holds secret, plus the public keys it trusts."""

    ring: KeyRing | None
    signing: SigningKey
    trusted: Mapping[str, Ed25519PublicKey]

    @classmethod
    def build(cls, ring: KeyRing | None, signing: SigningKey,
              older_public: Iterable[Ed25519PublicKey] = ()) -> AuditKeys:
        trusted = {key_id(k): k for k in older_public}
        trusted[signing.id] = signing.public
        return cls(ring, signing, trusted)


def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the start of its SHA-256 fingerprint."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# -- reading ------------------------------------------------------------------------------


def parse_data_keys(text: str, source: str) -> list[DataKey]:
    """Data keys from a key file's text or an environment value (newline, ',' or ';')."""
    keys = []
    lines = (line.partition("#")[0] for line in text.splitlines())
    entries = [e.strip() for line in lines for e in re.split(r"[,;]", line)]
    for number, entry in enumerate((e for e in entries if e), start=1):
        key_id, _, encoded = entry.replace(":", " ", 1).partition(" ")
        encoded = encoded.strip()
        if not encoded:
            raise AuditKeyError(f"{source}: entry {number} is not '<key id> <base64 key>'")
        try:
            secret = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise AuditKeyError(f"{source}: key '{key_id[:40]}' is not valid base64") from None
        keys.append(DataKey.from_secret(key_id, secret))
    if not keys:
        raise AuditKeyError(f"{source}: holds no audit data keys")
    return keys


def read_data_key_file(path: Path) -> list[DataKey]:
    return parse_data_keys(_read_secret_file(path), str(path))


def parse_signing_key(text: str, source: str) -> SigningKey:
    """A PKCS#8 PEM Ed25519 private key, or its 32 raw bytes in base64."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            private = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            private = Ed25519PrivateKey.from_private_bytes(
                base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm):
        raise AuditKeyError(f"{source}: not an Ed25519 private key (PEM or base64)") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise AuditKeyError(f"{source}: the signing key must be Ed25519")
    return SigningKey.from_private(private)


def read_signing_key_file(path: Path) -> SigningKey:
    return parse_signing_key(_read_secret_file(path), str(path))


def read_public_keys(path: Path) -> list[Ed25519PublicKey]:
    """Every Ed25519 public key in a file: PEM blocks (one or several) or base64 lines."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise AuditKeyError(f"{path}: {exc.strerror or exc}") from None
    keys: list[Ed25519PublicKey] = []
    blocks = re.findall(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", text, re.S)
    try:
        for block in blocks:
            public = serialization.load_pem_public_key(block.encode())
            if not isinstance(public, Ed25519PublicKey):
                raise AuditKeyError(f"{path}: holds a public key that is not Ed25519")
            keys.append(public)
        if not blocks:
            for line in text.split():
                keys.append(Ed25519PublicKey.from_public_bytes(
                    base64.b64decode(line, validate=True)))
    except (ValueError, binascii.Error, UnsupportedAlgorithm):
        raise AuditKeyError(f"{path}: not an Ed25519 public key (PEM or base64)") from None
    if not keys:
        raise AuditKeyError(f"{path}: holds no public key")
    return keys


def _read_secret_file(path: Path) -> str:
    try:
        return read_key_text(path, "audit key")
    except OSError as exc:
        raise AuditKeyError(f"{path}: {exc.strerror or exc}") from None


# -- creating -----------------------------------------------------------------------------


def new_data_key_line() -> str:
    """A fresh data key entry, `<id> <base64>`, with an id that sorts by creation."""
    key_id = f"k{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"
    return f"{key_id} {base64.b64encode(secrets.token_bytes(32)).decode()}"


def create_data_key_file(path: Path) -> None:
    _write_private(path, _FILE_HEADER + new_data_key_line() + "\n")


def create_signing_key_files(path: Path, public_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    _write_private(path, private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode())
    # Owner-only like every file in the data dir (a start refuses wider modes); others
    # get the public key from `isthmus audit public-key`.
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(public_pem(private.public_key()))


def _write_private(path: Path, text: str) -> None:
    """Create a file only its owner can read; never overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def load_keys(
    *,
    default_dir: Path,
    key_file: Path | None,
    keys_text: str | None,
    signing_key_file: Path | None,
    signing_key_text: str | None,
    trusted_public_key_files: Iterable[Path] = (),
    create: bool = False,
    need_data_keys: bool = True,
) -> tuple[AuditKeys, list[Path]]:
    """Load the audit keys from what the configuration names, or the default files.

    With `create` (the gateway starting), default files that do not exist yet are
    generated, owner-only; the paths generated are returned so the caller can say so.
    Explicitly configured files must exist.
    """
    generated: list[Path] = []
    ring: KeyRing | None = None
    if keys_text:
        ring = KeyRing(tuple(parse_data_keys(keys_text, "audit.keys")))
    else:
        path = key_file or default_dir / DATA_KEY_FILE
        if key_file is None and create and not path.exists():
            create_data_key_file(path)
            generated.append(path)
        if path.exists() or need_data_keys:
            ring = KeyRing(tuple(read_data_key_file(path)))
    if signing_key_text:
        signing = parse_signing_key(signing_key_text, "audit.signing_key")
    else:
        path = signing_key_file or default_dir / SIGNING_KEY_FILE
        if signing_key_file is None and create and not path.exists():
            create_signing_key_files(path, default_dir / PUBLIC_KEY_FILE)
            generated.append(path)
        signing = read_signing_key_file(path)
    older = [k for f in trusted_public_key_files for k in read_public_keys(f)]
    return AuditKeys.build(ring, signing, older), generated
