"""The sealed form of a record: canonical bytes with its PHI encrypted.

The body is JSON with sorted keys, no insignificant whitespace, UTF-8, and empty fields
left out; these bytes are what the chain hashes and what exports carry, so they are never
re-serialised once written.

PHI (patient reference, resource id, query values) travels in one AES-256-GCM envelope
under the newest data key, named by id. Inside the envelope a random salt sits beside the
values, and the body keeps the SHA-256 of that plaintext: a decrypted export shows the
plaintext, and anyone can check it against the signed body without a key, while the
digest alone reveals nothing (the salt is secret).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import orjson

# RevealError: defined in errors.py; imported here too for the old import path.
from gateway.audit.errors import RevealError as RevealError
from gateway.audit.keys import KeyRing
from gateway.audit.patient import identifier_part
from gateway.audit.record import AuditRecord
from gateway.store.audit import AuditRow

BODY_VERSION = 1
_OPTIONS = orjson.OPT_SORT_KEYS

# Body keys for the plain (non-PHI) fields of a record, in AuditRecord order.
_PLAIN = (
    ("client_id", "client"), ("user", "user"), ("tls_subject", "tls_subject"),
    ("sending_application", "app"), ("sending_facility", "facility"), ("peer", "peer"),
    ("resource_type", "type"), ("control_id", "control_id"), ("query_shape", "query"),
    ("purpose", "purpose"), ("profile", "profile"), ("trace_id", "trace"),
    ("detail", "detail"),
)
_PLAIN_NAMES = tuple(name for _, name in _PLAIN)
_plain_values = attrgetter(*(attr for attr, _ in _PLAIN))


@dataclass(frozen=True, slots=True)
class Revealed:
    """Decrypted PHI of one record and the exact plaintext it was sealed from."""

    plaintext: bytes
    patient: str | None
    resource_id: str | None
    query: str | None


def canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=_OPTIONS)


def seal(record: AuditRecord, time: str, ring: KeyRing, server: str) -> AuditRow:
    """The store row for a record: canonical body, PHI encrypted, search columns."""
    # Written for the hot path (every MLLP message): no helper calls that can be avoided.
    action = record.action  # a str enum: orjson and SQLite take it as its text
    body: dict[str, Any] = {"v": BODY_VERSION, "time": time, "action": action,
                            "outcome": record.outcome, "server": server}
    for name, value in zip(_PLAIN_NAMES, _plain_values(record), strict=False):
        if value:
            body[name] = value
    patient = record.patient
    patient_index = patient_id_index = None
    if patient or record.resource_id or record.query:
        key = ring.current
        phi: dict[str, str] = {}
        if patient:
            phi["patient"] = patient
            patient_index = key.blind_index("ref:" + patient)
            patient_id_index = key.blind_index("id:" + identifier_part(patient))
            body["patient_index"] = patient_index.hex()
            body["patient_id_index"] = patient_id_index.hex()
        if record.resource_id:
            phi["resource_id"] = record.resource_id
        if record.query:
            phi["query"] = record.query
        nonce, salt = _random()
        phi["salt"] = _b64(salt)
        plaintext = _dumps(phi, option=_OPTIONS)
        body["phi"] = {
            "key": key.id,
            # The 12-byte nonce, then the ciphertext with its 16-byte tag.
            "data": _b64(nonce + key.cipher.encrypt(nonce, plaintext, key.aad)),
            "digest": _sha256(plaintext).hexdigest(),
        }
    return AuditRow(time, action, record.client_id, record.outcome, patient_index,
                    patient_id_index, _dumps(body, option=_OPTIONS))


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


_dumps = orjson.dumps
_sha256 = hashlib.sha256


class _RandomPool:
    """Nonces and salts from the OS CSPRNG, fetched in bulk: one syscall per 2,340 records.
    Every byte is handed out once, so no nonce repeats under a key."""

    _CHUNK = 65_520  # a multiple of 28

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0

    def __call__(self) -> tuple[bytes, bytes]:
        if self._offset >= len(self._buffer):
            self._buffer = os.urandom(self._CHUNK)
            self._offset = 0
        start = self._offset
        self._offset += 28
        return self._buffer[start:start + 12], self._buffer[start + 12:start + 28]


_random = _RandomPool()


def parse_body(body: bytes) -> dict[str, Any]:
    value = orjson.loads(body)
    if not isinstance(value, dict):
        raise ValueError("an audit body is a JSON object")
    return value


def reveal(body: dict[str, Any], ring: KeyRing | None) -> Revealed | None:
    """Decrypt a body's PHI; None when it has none. Raises RevealError when it cannot."""
    phi = body.get("phi")
    if phi is None:
        return None
    key = ring.get(str(phi.get("key"))) if ring is not None else None
    if key is None:
        raise RevealError(f"audit data key '{phi.get('key')}' is not loaded")
    try:
        data = base64.b64decode(phi["data"])
        plaintext = key.cipher.decrypt(data[:12], data[12:], key.aad)
    except Exception:  # InvalidTag, bad base64, missing fields: all mean "cannot read"
        raise RevealError("the PHI envelope does not decrypt") from None
    return revealed_from(plaintext)


def revealed_from(plaintext: bytes) -> Revealed:
    values = orjson.loads(plaintext)
    return Revealed(plaintext, values.get("patient"), values.get("resource_id"),
                    values.get("query"))


def plaintext_matches(body: dict[str, Any], plaintext: bytes) -> bool:
    """Whether revealed plaintext is what the body's digest commits to."""
    phi = body.get("phi")
    return phi is not None and hashlib.sha256(plaintext).hexdigest() == phi.get("digest")


def columns_match(body: dict[str, Any], recorded_at: str, action: str, client_id: str,
                  outcome: str, patient_index: bytes | None,
                  patient_id_index: bytes | None) -> bool:
    """Whether a row's search columns say what its sealed body says."""
    return (body.get("time") == recorded_at and body.get("action") == action
            and body.get("client", "") == client_id and body.get("outcome") == outcome
            and body.get("patient_index") == (patient_index.hex() if patient_index else None)
            and body.get("patient_id_index") == (
                patient_id_index.hex() if patient_id_index else None))
