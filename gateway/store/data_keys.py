"""The store's data keys and the data dir's encryption marker, handled like the audit keys.

Keys: a file with one key a line, `<id> <base64 of 32 bytes>`, oldest first, `#` comments
allowed (default `DATA_DIR/keys/store-data.keys`, generated owner-only for a new data dir),
or the same entries as `id:base64,id:base64` from the environment. The last key seals,
every key listed opens.

The marker, `DATA_DIR/encryption.json`, says that the data dir is sealed and with which
keys: for each key id that sealed something, a check value sealed under it (so a missing
or wrong key is one clear error at start, not garbage or a traceback later), and the id of
the key the blind indexes are computed with. It holds nothing secret. It is replaced
atomically (written beside, fsynced, renamed).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway.store.data_dir import FILE_MODE, read_key_text
from gateway.store.sealing import (
    PLAIN,
    DataKey,
    KeyRing,
    RowCodec,
    SealedCodec,
    SealError,
)

log = logging.getLogger(__name__)

KEY_FILE = "store-data.keys"
MARKER_FILE = "encryption.json"
SEALED = "sealed"
# `isthmus store encrypt` is under way (or was interrupted): a start refuses the data dir.
MIGRATING = "migrating"

_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,40}")
_CHECK = b"isthmus store check"
_CHECK_CONTEXT = "marker\x1fcheck"
_FILE_HEADER = """\
# Isthmus store data keys (AES-256), one a line: <key id> <base64 of 32 random bytes>.
# Oldest first; the last key seals new values and every key listed opens.
# Never remove a key while values sealed with it remain (`isthmus store status` names
# the keys in use; `isthmus store encrypt` re-seals everything under the newest).
"""


@dataclass(frozen=True)
class Marker:
    state: str
    index_key: str
    checks: dict[str, str]  # key id -> base64 of a check value sealed under it

    def to_json(self) -> str:
        return json.dumps({"version": 1, "state": self.state, "index_key": self.index_key,
                           "checks": self.checks}, indent=2, sort_keys=True) + "\n"


def parse_keys(text: str, source: str) -> KeyRing:
    """A ring from a key file's text or an environment value (newline, ',' or ';')."""
    keys: list[DataKey] = []
    lines = (line.partition("#")[0] for line in text.splitlines())
    entries = [e.strip() for line in lines for e in re.split(r"[,;]", line)]
    for number, entry in enumerate((e for e in entries if e), start=1):
        key_id, _, encoded = entry.replace(":", " ", 1).partition(" ")
        if not _KEY_ID.fullmatch(key_id) or not encoded.strip():
            raise SealError(f"{source}: entry {number} is not '<key id> <base64 key>' (ids: "
                            "letters, digits, '.', '_', '-')")
        try:
            secret = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise SealError(f"{source}: key '{key_id}' is not valid base64") from None
        keys.append(DataKey.from_secret(key_id, secret))
    if not keys:
        raise SealError(f"{source}: holds no store data keys")
    return KeyRing(tuple(keys))


def read_key_file(path: Path) -> KeyRing:
    try:
        text = read_key_text(path, "store key")
    except OSError as exc:
        raise SealError(f"store data keys {path}: {exc.strerror or exc}") from None
    return parse_keys(text, str(path))


def new_key_line() -> str:
    """A fresh key entry, `<id> <base64>`, with an id that sorts by creation."""
    key_id = f"s{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"
    return f"{key_id} {base64.b64encode(secrets.token_bytes(32)).decode()}"


def create_key_file(path: Path) -> None:
    """A new key file, owner-only; never overwrites one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(_FILE_HEADER + new_key_line() + "\n")


@dataclass(frozen=True)
class KeySource:
    """Where the keys come from, as the configuration says: inline text, a file, or the
    default file in the keys directory (which a new data dir may generate)."""

    default_file: Path
    key_file: Path | None = None
    keys_text: str | None = None

    def describe(self) -> str:
        if self.keys_text:
            return "encryption.keys"
        return str(self.key_file or self.default_file)

    def load(self, *, create: bool = False) -> tuple[KeyRing, bool]:
        """The ring, and whether the default key file was generated just now."""
        if self.keys_text:
            return parse_keys(self.keys_text, "encryption.keys"), False
        path = self.key_file or self.default_file
        generated = False
        if self.key_file is None and create and not path.exists():
            create_key_file(path)
            generated = True
        if not path.exists():
            raise SealError(f"the data dir is encrypted but no store data keys are at "
                            f"{path}; set encryption.key_file or ISTHMUS_ENCRYPTION__KEYS "
                            "(see docs/encryption.md)")
        return read_key_file(path), generated


# -- the marker -------------------------------------------------------------------------


def read_marker(data_dir: Path) -> Marker | None:
    path = data_dir / MARKER_FILE
    try:
        value = json.loads(path.read_text())
        return Marker(str(value["state"]), str(value["index_key"]),
                      {str(k): str(v) for k, v in dict(value["checks"]).items()})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise SealError(f"{path} is not a readable encryption marker") from None


def write_marker(data_dir: Path, marker: Marker) -> None:
    """Replace the marker atomically: a crash leaves the old one or the new one."""
    path = data_dir / MARKER_FILE
    temporary = path.with_name(path.name + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as fh:
        fh.write(marker.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)
    directory = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def marker_for(ring: KeyRing, state: str, index_key: str,
               earlier: Marker | None = None) -> Marker:
    """A marker with a check value for every key of the ring (and those of `earlier`
    kept: a key that sealed something must stay loaded)."""
    checks = dict(earlier.checks) if earlier is not None else {}
    for key in ring.keys:
        if key.id not in checks:
            checks[key.id] = base64.b64encode(
                SealedCodec(KeyRing((key,)), key.id).seal(_CHECK, _CHECK_CONTEXT)).decode()
    return Marker(state, index_key, checks)


def check_keys(ring: KeyRing, marker: Marker, source: str) -> None:
    """Every key that sealed something is loaded and is the same key (its check opens)."""
    codec = SealedCodec(ring, ring.current.id)
    for key_id, check in marker.checks.items():
        if ring.get(key_id) is None:
            raise SealError(f"store data key '{key_id}' sealed data in this data dir but is "
                            f"not in {source}; add it back (see docs/encryption.md)")
        try:
            opened = codec.open(base64.b64decode(check), _CHECK_CONTEXT)
        except (SealError, binascii.Error, ValueError):
            opened = b""
        if opened != _CHECK:
            raise SealError(f"store data key '{key_id}' in {source} is not the key that "
                            "sealed this data dir (wrong key under that id)")
    if ring.get(marker.index_key) is None:
        raise SealError(f"the blind index key '{marker.index_key}' is not in {source}")


# -- at start ---------------------------------------------------------------------------


def open_codec(data_dir: Path, source: KeySource, *, enabled: bool,
               databases: Sequence[Path], create: bool = True) -> RowCodec:
    """The codec a data dir is read and written with, decided once at start:

    - marked sealed: its keys, checked against the marker (a key added since is recorded);
    - not marked but holding databases: made before encryption, it stays plaintext (a
      warning says how to migrate it);
    - new (no database yet) and `enabled`: keys loaded or generated, the marker written.
    """
    marker = read_marker(data_dir)
    if marker is not None:
        if marker.state != SEALED:
            raise SealError(f"`isthmus store encrypt` did not finish on {data_dir}; run it "
                            "again before starting the gateway")
        ring, _ = source.load()
        check_keys(ring, marker, source.describe())
        if any(key.id not in marker.checks for key in ring.keys):
            write_marker(data_dir, marker_for(ring, SEALED, marker.index_key, marker))
        return SealedCodec(ring, marker.index_key)
    if any(_has_data(path) for path in databases):
        if enabled and create:  # said once per start, not by every CLI command
            log.warning("data dir %s was made before encryption at rest: its PHI is not "
                        "sealed; run `isthmus store encrypt --data-dir %s` while the gateway "
                        "is stopped (docs/encryption.md)", data_dir, data_dir)
        return PLAIN
    if not enabled or not create:
        return PLAIN
    ring, generated = source.load(create=True)
    if generated:
        log.warning("no store data keys configured: generated %s (owner-only). Keep a copy "
                    "apart from the data, or set encryption.key_file; see docs/encryption.md",
                    source.default_file)
    write_marker(data_dir, marker_for(ring, SEALED, ring.current.id))
    return SealedCodec(ring, ring.current.id)


def _has_data(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False
