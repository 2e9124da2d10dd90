"""`isthmus store encrypt`: seal a plaintext data dir in place, or re-seal a sealed one
under its newest key (after a rotation), safely.

Safe means: the data dir's lock is held throughout (a running gateway refuses it, and no
gateway starts meanwhile); the marker says `migrating` before anything changes, so a start
refuses a half-done dir; each database changes in one transaction (a crash leaves it as it
was or as it is meant to be), and a second run finishes what a crash interrupted (values
already sealed under the newest key are skipped; the FHIR index tables record that they
are blinded in the same transaction that blinds them). Then every value is read back with
the strict codec, and only then is the marker `sealed`. Freed pages are zeroed
(secure_delete), the files vacuumed and the WAL truncated, so no plaintext copy stays in
the files (docs/encryption.md says what a file system may still keep).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.store.data_dir import DataDirLock
from gateway.store.data_keys import (
    MIGRATING,
    SEALED,
    KeySource,
    check_keys,
    marker_for,
    read_marker,
    write_marker,
)
from gateway.store.fhir import IndexEntry, StringGroups, StringIndex, TokenIndex
from gateway.store.fhir_sqlite.blinding import StringLabels, index_rows, shared_labels
from gateway.store.fhir_sqlite.schema import (
    INDEX_INSERTS,
    RECORD_LABELS,
    STRING_LABEL_TABLE,
    key_by_rid,
)
from gateway.store.inbox_sqlite import blind_patient
from gateway.store.sealing import (
    SealedCodec,
    SealError,
    fhir_context,
    inbox_context,
    sealed_key_id,
)

_BLINDED = "blind_index_key"


@dataclass
class SealCounts:
    inbox_values: int = 0
    fhir_bodies: int = 0
    index_rows: int = 0
    checked: int = 0


def seal_data_dir(data_dir: Path, inbox: Path, fhir: Path, source: KeySource,
                  string_groups: StringGroups | None = None) -> tuple[SealCounts, SealedCodec]:
    """Seal (or re-seal under the newest key) every PHI value in the data dir; raises
    DataDirInUse while a gateway holds it, SealError when keys do not fit. The string
    rows are blinded as the store writes them, shared within `string_groups`
    (`SearchRegistry.string_groups`); without them, one set per parameter (the layout a
    sealed store also finds)."""
    lock = DataDirLock.acquire(data_dir)
    try:
        ring, _ = source.load(create=read_marker(data_dir) is None)
        marker = read_marker(data_dir)
        index_key = marker.index_key if marker is not None else ring.current.id
        if marker is not None:
            check_keys(ring, marker, source.describe())
        write_marker(data_dir, marker_for(ring, MIGRATING, index_key, marker))
        codec = SealedCodec(ring, index_key)
        counts = SealCounts()
        if _has_file(inbox):
            with _connection(inbox) as db:
                counts.inbox_values = _seal_inbox(db, codec)
            counts.checked += _check(inbox, codec, _INBOX_READS, _inbox_context)
        if _has_file(fhir):
            with _connection(fhir) as db:
                counts.fhir_bodies, counts.index_rows = _seal_fhir(
                    db, codec, StringLabels(string_groups or {}))
            counts.checked += _check(fhir, codec, _FHIR_READS, _fhir_context)
        write_marker(data_dir, marker_for(ring, SEALED, index_key, read_marker(data_dir)))
        return counts, codec
    finally:
        lock.release()


@contextmanager
def _connection(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA secure_delete=ON")  # freed pages zeroed: no plaintext left
        yield db
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def _stale(value: bytes | None, codec: SealedCodec) -> bool:
    """A value still to (re-)seal: plaintext, or sealed under an older key."""
    return value is not None and sealed_key_id(value) != codec.ring.current.id


def _seal_inbox(db: sqlite3.Connection, codec: SealedCodec) -> int:
    reader = codec.reading_plain()
    updates: list[tuple[bytes, bytes | None, int]] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        rows = db.execute("SELECT id, raw, bundle, sending_application, sending_facility, "
                          "control_id, received_at FROM inbox").fetchall()
        changed = 0
        for row_id, raw, bundle, *identity in rows:
            if not (_stale(raw, codec) or _stale(bundle, codec)):
                continue
            names = [str(v) for v in identity]
            new_raw = codec.seal(reader.open(bytes(raw), inbox_context("raw", *names)),
                                 inbox_context("raw", *names))
            new_bundle = None if bundle is None else codec.seal(
                reader.open(bytes(bundle), inbox_context("bundle", *names)),
                inbox_context("bundle", *names))
            updates.append((new_raw, new_bundle, int(row_id)))
            changed += 1 + (bundle is not None)
        db.executemany("UPDATE inbox SET raw = ?, bundle = ? WHERE id = ?", updates)
        _blind_patient_keys(db, codec)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return changed


def _blind_patient_keys(db: sqlite3.Connection, codec: SealedCodec) -> None:
    """The inbox's and outbox's patient keys as blind indexes, once (recorded in the same
    transaction, as the FHIR indexes are)."""
    if _blinded_with(db, "store_meta", codec):
        return
    keys = {str(k) for (k,) in db.execute(
        "SELECT patient_key FROM inbox WHERE patient_key != '' UNION "
        "SELECT patient_key FROM outbox WHERE patient_key != ''")}
    for table in ("inbox", "outbox"):
        db.executemany(f"UPDATE {table} SET patient_key = ? WHERE patient_key = ?",
                       [(blind_patient(key, codec), key) for key in keys])
    db.execute("INSERT INTO store_meta (key, value) VALUES (?, ?)",
               (_BLINDED, codec.index_key_id))


def _blinded_with(db: sqlite3.Connection, table: str, codec: SealedCodec) -> bool:
    """Whether this database's blind indexes are made already (by an earlier run)."""
    done = db.execute(f"SELECT value FROM {table} WHERE key = ?", (_BLINDED,)).fetchall()
    if done and done[0][0] != codec.index_key_id:
        raise SealError(f"the blind indexes are made with key '{done[0][0]}', the marker "
                        f"names '{codec.index_key_id}'")
    return bool(done)


def _seal_fhir(db: sqlite3.Connection, codec: SealedCodec, labels: StringLabels
               ) -> tuple[int, int]:
    reader = codec.reading_plain()
    # A store from before `rid`: its index rows, versions and events named as the writer
    # names them.
    key_by_rid(db)
    db.execute("BEGIN IMMEDIATE")
    try:
        # The archive triggers would add a version per UPDATE: set aside, then restored.
        triggers = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                              "AND tbl_name = 'fhir_resource'").fetchall()
        for name, _ in triggers:
            db.execute(f'DROP TRIGGER "{name}"')
        bodies = 0
        for table, key in (("fhir_resource", "type, id"), ("fhir_version", "seq")):
            rows = db.execute(f"SELECT {key}, type, id, version, body FROM {table}").fetchall()
            updates = []
            for row in rows:
                *where, resource_type, id_, version, body = row
                if not _stale(body, codec):
                    continue
                context = fhir_context(str(resource_type), str(id_), int(version))
                updates.append((codec.seal(reader.open(bytes(body), context), context),
                                *where))
            condition = " AND ".join(f"{c.strip()} = ?" for c in key.split(","))
            db.executemany(f"UPDATE {table} SET body = ? WHERE {condition}", updates)
            bodies += len(updates)
        for _, sql in triggers:
            db.execute(sql)
        index_rows = _blind_index_tables(db, codec, labels)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return bodies, index_rows


def _blind_index_tables(db: sqlite3.Connection, codec: SealedCodec,
                        labels: StringLabels) -> int:
    """Token and string index rows as blind indexes, once (recorded in the same
    transaction, so a second run does not blind them twice); each resource's together,
    so that the values its parameters share are written once (blinding.index_rows)."""
    if _blinded_with(db, "fhir_store_meta", codec):
        return 0
    rows: dict[tuple[str, str], list[IndexEntry]] = {}
    named = "JOIN fhir_resource r ON r.rid = x.rid"
    for t, i, p, s, c in db.execute(
            f"SELECT r.type, r.id, x.param, x.system, x.code FROM fhir_token x {named}"):
        rows.setdefault((str(t), str(i)), []).append(TokenIndex(str(p), s, str(c)))
    for t, i, p, n, e in db.execute(
            f"SELECT r.type, r.id, x.param, x.normalized, x.exact FROM fhir_string x {named}"):
        rows.setdefault((str(t), str(i)), []).append(StringIndex(str(p), str(n), str(e)))
    db.execute("DELETE FROM fhir_token")
    db.execute("DELETE FROM fhir_string")
    db.execute(STRING_LABEL_TABLE)
    written = 0
    for (resource_type, id_), items in rows.items():
        for kind, values in index_rows(resource_type, id_, items, codec, labels).items():
            db.executemany(INDEX_INSERTS[kind], values)
            if kind is StringIndex:
                db.executemany(RECORD_LABELS, shared_labels(values))
            written += len(values)
    db.execute("INSERT INTO fhir_store_meta (key, value) VALUES (?, ?)",
               (_BLINDED, codec.index_key_id))
    return written


# Every sealed column with what names its row (the associated data it was sealed with).
_INBOX_READS = (
    "SELECT raw, 'raw', sending_application, sending_facility, control_id, received_at "
    "FROM inbox",
    "SELECT bundle, 'bundle', sending_application, sending_facility, control_id, "
    "received_at FROM inbox WHERE bundle IS NOT NULL",
)
_FHIR_READS = ("SELECT body, type, id, version FROM fhir_resource",
               "SELECT body, type, id, version FROM fhir_version")


def _inbox_context(names: Sequence[object]) -> str:
    column, application, facility, control_id, received_at = (str(n) for n in names)
    return inbox_context(column, application, facility, control_id, received_at)


def _fhir_context(names: Sequence[object]) -> str:
    return fhir_context(str(names[0]), str(names[1]), int(str(names[2])))


def _check(path: Path, codec: SealedCodec, statements: Sequence[str],
           context: Callable[[Sequence[object]], str]) -> int:
    """Every sealed value opens with the strict codec (no plaintext left, none garbled)."""
    opened = 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for sql in statements:
            for value, *names in db.execute(sql):
                codec.open(bytes(value), context(names))
                opened += 1
    finally:
        db.close()
    return opened


def _has_file(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0
