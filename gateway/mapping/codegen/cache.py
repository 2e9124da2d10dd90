"""The generated source of a table set, kept on disk by the tables' hash, so a start that
finds it neither reads, checks nor compiles a table (nor imports the HL7 definitions and
the FHIR model the checks need).

The key hashes every table file (shipped and site), the site offset, the Python version,
fhir.resources' version and the sources of the mapping package (the compiler and this
generator): any change makes a new file, never a stale answer. Files are written to a
temporary name and renamed into place, so a reader never sees half of one and two
processes writing the same key at once both leave a whole file. A cache that cannot be
read or written costs only the time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import marshal
import os
import sys
import tempfile
import time
from pathlib import Path
from types import CodeType

from gateway.mapping.tables import table_files

log = logging.getLogger(__name__)

_MAPPING = Path(__file__).resolve().parent.parent
_FHIR_SOURCES = ("model.py", "bindings.py")
PRUNE_AFTER_SECONDS = 30 * 24 * 3600


def tables_key(directory: Path, site: Path | None, default_offset: str) -> str:
    """The hash naming the generated module for these tables (TableError if a table
    directory is not one)."""
    digest = hashlib.sha256()
    digest.update(f"{sys.version}\0{default_offset}\0".encode())
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        digest.update(importlib.metadata.version("fhir.resources").encode())
    for relative, path in sorted(table_files(directory, site).items()):
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    for source in sorted(_MAPPING.rglob("*.py")):
        digest.update(source.read_bytes())
    fhir = _MAPPING.parent / "fhir"
    for name in _FHIR_SOURCES:
        with contextlib.suppress(OSError):
            digest.update((fhir / name).read_bytes())
    return digest.hexdigest()[:32]


def cached_code(cache_dir: Path, key: str) -> CodeType | None:
    """The generated module's code from an earlier run, None if there is none usable."""
    path = cache_dir / f"tables-{key}.code"
    if not (_ours(cache_dir) and _ours(path)):
        return None
    try:
        code = marshal.loads(path.read_bytes())
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if not isinstance(code, CodeType):
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # in use: not pruned (`store`)
    return code


def writable(cache_dir: Path) -> bool:
    """Whether files can be kept in `cache_dir` (made if missing, owner-only): ours, and
    no one else's to write (what is loaded from it runs as code)."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return False
    return _ours(cache_dir) and os.access(cache_dir, os.W_OK | os.X_OK)


def _ours(path: Path) -> bool:
    """Owned by this user and writable by no one else: code loaded from it is ours."""
    try:
        status = path.stat()
    except OSError:
        return False
    return status.st_uid == os.getuid() and not status.st_mode & 0o022


def store(cache_dir: Path, key: str, source: str, code: CodeType) -> None:
    """Keep the source (for a reader) and its code (what a start loads), each renamed into
    place whole; a failure is logged and costs the next start the time."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(cache_dir / f"tables-{key}.py", source.encode())
        _write(cache_dir / f"tables-{key}.code", marshal.dumps(code))
    except OSError as exc:
        log.warning("the compiled tables could not be cached in %s: %s", cache_dir,
                    type(exc).__name__)
        return
    _prune(cache_dir, key)


def _prune(cache_dir: Path, key: str) -> None:
    """Modules of other table sets (edited tables, an upgrade) not loaded for a month go:
    each is a few MB, and a table set in use is touched at every load."""
    horizon = time.time() - PRUNE_AFTER_SECONDS
    for path in cache_dir.glob("tables-*"):
        with contextlib.suppress(OSError):
            if key not in path.name and path.stat().st_mtime < horizon:
                path.unlink()


def _write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
