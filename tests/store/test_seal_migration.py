"""`isthmus store encrypt` at the store layer: a plaintext data dir sealed in place, an
interrupted run refused at start and finished by the next, nothing blinded twice."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import message
from gateway.app.tables import search_registry
from gateway.config import load_settings
from gateway.store.data_dir import DataDirLock
from gateway.store.data_keys import (
    MIGRATING,
    KeySource,
    open_codec,
    read_marker,
    write_marker,
)
from gateway.store.errors import DataDirInUse
from gateway.store.fhir import SearchQuery, StringMatch, TokenMatch, WriteRequest
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.inbox import InboundMessage
from gateway.store.inbox_sqlite import SqliteInbox
from gateway.store.outbox import SqliteOutbox
from gateway.store.seal_migration import seal_data_dir
from gateway.store.sealing import RowCodec, SealError
from support.builders import patient
from support.sealed import ADT_CANARIES, canaries_in_files

KEYS = "k1 " + base64.b64encode(b"1" * 32).decode()
RAW = message("canary_adt_a01.hl7")


async def _plaintext_data_dir(data_dir: Path) -> str:
    """An inbox with the canary message and a FHIR store with a canary Patient (two
    versions), both plaintext; returns the Patient's id."""
    inbox = await SqliteInbox.open(data_dir / "inbox.db")
    try:
        await inbox.accept(InboundMessage("SYNTHADT", "SYNTHHOSP", "C-1", "ADT^A01", "2.5.1",
                                          "peer", RAW, b"MSH|ack", datetime.now(UTC),
                                          routes=("lab",), patient_key="p1"))
    finally:
        await inbox.close()
    store = await _fhir(data_dir, None)
    try:
        resource = patient("MRNMIGRATED", family="Qzxmigrated", given=["Wqvmigrated"])
        created = await store.transact([WriteRequest("POST", "Patient", resource=resource)])
        stored = created[0].stored
        assert stored is not None
        resource["id"] = stored.id
        resource["gender"] = "female"
        await store.transact([WriteRequest("PUT", "Patient", id=stored.id, resource=resource)])
        return stored.id
    finally:
        await store.close()


async def _fhir(data_dir: Path, codec: RowCodec | None) -> SqliteFhirStore:
    registry = search_registry(load_settings(None, environ={}))
    if codec is None:
        return await SqliteFhirStore.open(data_dir / "fhir.db", registry.index)
    return await SqliteFhirStore.open(data_dir / "fhir.db", registry.index, codec=codec,
                                      string_groups=registry.string_groups())


def _source(data_dir: Path) -> KeySource:
    return KeySource(default_file=data_dir / "keys" / "store-data.keys", keys_text=KEYS)


def _open(data_dir: Path) -> RowCodec:
    return open_codec(data_dir, _source(data_dir), enabled=True,
                      databases=[data_dir / "inbox.db", data_dir / "fhir.db"])


async def _readable(data_dir: Path, patient_id: str) -> None:
    codec = _open(data_dir)
    assert codec.sealed
    inbox = await SqliteInbox.open(data_dir / "inbox.db", codec=codec)
    try:
        assert [r[1] for r in await inbox.with_status("accepted")] == [RAW]
        due = await SqliteOutbox(inbox.connection, codec).due("lab", "mllp", 0, 10)
        assert [(r.payload, r.patient_key) for r in due] == [(RAW, codec.blind("p1", "patient"))]
    finally:
        await inbox.close()
    store = await _fhir(data_dir, codec)
    try:
        for match in (TokenMatch("identifier", None, "MRNMIGRATED"),
                      StringMatch("family", "qzxmig"),
                      StringMatch("given", "Wqvmigrated", "exact")):
            page = await store.search(SearchQuery("Patient", ((match,),)))
            assert [r.id for r in page.resources] == [patient_id], match
        first = await store.vread("Patient", patient_id, 1)
        assert first is not None and b"Wqvmigrated" in first.body
    finally:
        await store.close()


async def test_store_encrypt_seals_a_plaintext_data_dir_in_place(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o700)
    patient_id = await _plaintext_data_dir(data_dir)
    canaries = (*ADT_CANARIES, b"mrnmigrated", b"qzxmigrated", b"wqvmigrated")
    assert canaries_in_files(data_dir, canaries)
    assert _open(data_dir).sealed is False  # made before: it stays plaintext until asked
    counts, _ = seal_data_dir(data_dir, data_dir / "inbox.db", data_dir / "fhir.db",
                              _source(data_dir))
    # One message; the current Patient and its two versions.
    assert (counts.inbox_values, counts.fhir_bodies) == (1, 3)
    assert counts.checked == 4
    assert canaries_in_files(data_dir, canaries) == {}
    await _readable(data_dir, patient_id)


async def test_an_interrupted_run_is_refused_at_start_and_finished_by_the_next(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o700)
    patient_id = await _plaintext_data_dir(data_dir)
    seal_data_dir(data_dir, data_dir / "inbox.db", data_dir / "fhir.db", _source(data_dir))
    # As a crash after the databases were sealed and before the marker said so leaves it.
    marker = read_marker(data_dir)
    assert marker is not None
    write_marker(data_dir, type(marker)(MIGRATING, marker.index_key, marker.checks))
    with pytest.raises(SealError, match="did not finish"):
        _open(data_dir)
    counts, _ = seal_data_dir(data_dir, data_dir / "inbox.db", data_dir / "fhir.db",
                              _source(data_dir))
    # Nothing sealed or blinded twice: the second run found it all done.
    assert (counts.inbox_values, counts.fhir_bodies, counts.index_rows) == (0, 0, 0)
    await _readable(data_dir, patient_id)


async def test_store_encrypt_refuses_a_data_dir_a_gateway_holds(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o700)
    await _plaintext_data_dir(data_dir)
    held = DataDirLock.acquire(data_dir)
    try:
        # flock is per open file: a second acquisition in this process is refused too.
        with pytest.raises(DataDirInUse):
            seal_data_dir(data_dir, data_dir / "inbox.db", data_dir / "fhir.db",
                          _source(data_dir))
    finally:
        held.release()
    assert read_marker(data_dir) is None
