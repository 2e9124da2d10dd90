"""Sealing PHI at rest (issue 13, item 10), at the store layer: envelopes bound to their
row, key rotation, tampering, blind-index search, and the data dir's marker and keys."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import message
from gateway.app.tables import search_registry
from gateway.config import load_settings
from gateway.store.data_keys import KeySource, open_codec, parse_keys, read_marker
from gateway.store.errors import SearchUnsupported
from gateway.store.fhir import (
    SearchQuery,
    SortKey,
    StringIndex,
    StringMatch,
    TokenMatch,
    WriteConflict,
    WriteRequest,
)
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.fhir_sqlite.schema import INDEX_INSERTS
from gateway.store.inbox import InboundMessage
from gateway.store.inbox_sqlite import SqliteInbox
from gateway.store.outbox import SqliteOutbox
from gateway.store.sealing import (
    PLAIN,
    KeyRing,
    SealedCodec,
    SealError,
    fhir_context,
    inbox_context,
    sealed_key_id,
)
from support.builders import patient
from support.sealed import ADT_CANARIES, canaries_in_files

K1 = "k1 " + base64.b64encode(b"1" * 32).decode()
K2 = "k2 " + base64.b64encode(b"2" * 32).decode()
K1_OTHER = "k1 " + base64.b64encode(b"9" * 32).decode()
CONTEXT = inbox_context("raw", "APP", "FAC", "CTRL-1", "2026-01-01T00:00:00.000000Z")


def codec(*lines: str, index: str = "k1") -> SealedCodec:
    return SealedCodec(parse_keys("\n".join(lines), "test"), index)


def test_a_sealed_value_opens_only_on_its_own_row() -> None:
    sealed = codec(K1).seal(b"PID|1||MRN1", CONTEXT)
    assert b"MRN1" not in sealed
    assert codec(K1).open(sealed, CONTEXT) == b"PID|1||MRN1"
    other_row = inbox_context("raw", "APP", "FAC", "CTRL-2", "2026-01-01T00:00:00.000000Z")
    with pytest.raises(SealError, match="moved from another row"):
        codec(K1).open(sealed, other_row)
    with pytest.raises(SealError):
        codec(K1).open(sealed, fhir_context("Patient", "p1", 1))


def test_blind_values_are_the_keyed_mac_of_purpose_and_value_each_time_asked() -> None:
    # Kept blinds (a codec remembers those made lately) are the MAC itself, before and
    # after the codec's memory of them is full and emptied, and never another purpose's.
    sealed = codec(K1)
    index_key = sealed.ring.keys[0].index_key

    def mac(value: str, purpose: str) -> str:
        return hashlib.blake2b(f"{purpose}\x1f{value}".encode(), key=index_key,
                               digest_size=16).hexdigest()

    values = ["springfield", "st", "", "é漢字", "family12345"] + [f"v{n}" for n in range(9000)]
    for _ in range(2):
        for value in values:
            assert sealed.blind(value, "token") == mac(value, "token")
            assert sealed.blind(value, "exact") == mac(value, "exact")
            assert sealed.blind_prefixes(value, "prefix", 8) == tuple(
                mac(value[:n], "prefix") for n in range(1, min(len(value), 8) + 1))
    assert sealed.blind_prefixes("family12345", "prefix", 3) == tuple(
        mac(p, "prefix") for p in ("f", "fa", "fam"))


@pytest.mark.parametrize("position", [-1, -20, 30])
def test_a_tampered_value_is_refused(position: int) -> None:
    sealed = bytearray(codec(K1).seal(b"a raw message", CONTEXT))
    sealed[position] ^= 0x01
    with pytest.raises(SealError):
        codec(K1).open(bytes(sealed), CONTEXT)


def test_rotation_old_values_open_new_ones_use_the_newest_key() -> None:
    old = codec(K1).seal(b"sealed before", CONTEXT)
    rotated = codec(K1, K2)
    assert rotated.open(old, CONTEXT) == b"sealed before"
    new = rotated.seal(b"sealed after", CONTEXT)
    assert (sealed_key_id(old), sealed_key_id(new)) == ("k1", "k2")
    # Blind indexes stay those of the index key: a search still finds old rows.
    assert rotated.blind("mrn1", "token") == codec(K1).blind("mrn1", "token")
    with pytest.raises(SealError, match="'k2', which is not loaded"):
        codec(K1).open(new, CONTEXT)


def test_the_plain_codec_refuses_sealed_values_and_the_sealed_one_plaintext() -> None:
    with pytest.raises(SealError, match="without its data keys"):
        PLAIN.open(codec(K1).seal(b"x", CONTEXT), CONTEXT)
    with pytest.raises(SealError, match="not sealed"):
        codec(K1).open(b"MSH|^~\\&|plain", CONTEXT)
    assert codec(K1).reading_plain().open(b"MSH|plain", CONTEXT) == b"MSH|plain"


@pytest.mark.parametrize("text", ["k1 notbase64!", "k1 " + base64.b64encode(b"short").decode(),
                                  "bad id! " + base64.b64encode(b"1" * 32).decode(), "# none"])
def test_bad_key_entries_get_one_line(text: str) -> None:
    with pytest.raises(SealError) as caught:
        parse_keys(text, "keys.txt")
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_duplicate_key_ids_are_refused() -> None:
    with pytest.raises(SealError, match="unique"):
        KeyRing(parse_keys(K1, "a").keys + parse_keys(K1_OTHER, "b").keys)


# -- the marker and the start-up decision ----------------------------------------------


def _source(tmp_path: Path, *lines: str) -> KeySource:
    return KeySource(default_file=tmp_path / "var" / "keys" / "store-data.keys",
                     keys_text="\n".join(lines) if lines else None)


def test_a_new_data_dir_is_sealed_with_generated_owner_only_keys(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    source = _source(tmp_path)
    opened = open_codec(data_dir, source, enabled=True, databases=[data_dir / "inbox.db"])
    assert opened.sealed
    assert source.default_file.stat().st_mode & 0o777 == 0o600
    marker = read_marker(data_dir)
    assert marker is not None and marker.state == "sealed"
    assert (data_dir / "encryption.json").stat().st_mode & 0o777 == 0o600
    # The next start reads the same keys and marker.
    assert open_codec(data_dir, source, enabled=True, databases=[]).sealed


def test_a_data_dir_with_plaintext_databases_stays_plaintext(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    (data_dir / "inbox.db").write_bytes(b"SQLite format 3\x00")
    opened = open_codec(data_dir, _source(tmp_path, K1), enabled=True,
                        databases=[data_dir / "inbox.db"])
    assert opened is PLAIN and read_marker(data_dir) is None


def test_a_missing_or_wrong_key_is_one_clear_error_at_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    open_codec(data_dir, _source(tmp_path, K1), enabled=True, databases=[])
    with pytest.raises(SealError, match="'k1' sealed data in this data dir but is not in"):
        open_codec(data_dir, _source(tmp_path, K2), enabled=True, databases=[])
    with pytest.raises(SealError, match="not the key that sealed"):
        open_codec(data_dir, _source(tmp_path, K1_OTHER), enabled=True, databases=[])
    with pytest.raises(SealError, match="no store data keys are at"):
        open_codec(data_dir, _source(tmp_path), enabled=True, databases=[])
    # A key added (rotation) is recorded; the index key stays the first.
    open_codec(data_dir, _source(tmp_path, K1, K2), enabled=True, databases=[])
    marker = read_marker(data_dir)
    assert marker is not None and set(marker.checks) == {"k1", "k2"}
    assert marker.index_key == "k1"


# -- the stores with a sealed codec -----------------------------------------------------


def _inbound(raw: bytes, control_id: str, routes: tuple[str, ...] = ()) -> InboundMessage:
    return InboundMessage("SYNTHADT", "SYNTHHOSP", control_id, "ADT^A01", "2.5.1", "peer",
                          raw, b"MSH|ack", datetime.now(UTC), routes=routes,
                          patient_key="p1" if routes else "",
                          bundle=b'{"resourceType":"Bundle","canary":"QZXCANARYFAM"}'
                          if routes else None)


async def test_the_inbox_and_outbox_seal_payloads_and_hand_them_back_opened(
        tmp_path: Path) -> None:
    sealed = codec(K1)
    raw = message("canary_adt_a01.hl7")
    inbox = await SqliteInbox.open(tmp_path / "inbox.db", dedup_window=timedelta(days=1),
                                   codec=sealed)
    try:
        stored = await inbox.accept(_inbound(raw, "C-1", routes=("ehr",)))
        duplicate = await inbox.accept(_inbound(raw, "C-1", routes=("ehr",)))
        assert duplicate.duplicate and duplicate.inbox_id == stored.inbox_id
        found = await inbox.get(stored.inbox_id)
        assert found is not None and found[1] == raw
        assert [r[1] for r in await inbox.with_status("accepted")] == [raw]
        outbox = SqliteOutbox(inbox.connection, inbox.codec)
        # The patient's ordering key is a blind index, not the (guessable) hash itself.
        keys = await inbox.connection.execute_fetchall("SELECT patient_key FROM outbox")
        assert [k for (k,) in keys] == [sealed.blind("p1", "patient")]
        due_fhir = await outbox.due("ehr", "fhir", 0, 10)
        due_mllp = await outbox.due("ehr", "mllp", 0, 10)
        assert due_mllp[0].payload == raw
        assert due_fhir[0].payload is not None and b"QZXCANARYFAM" in due_fhir[0].payload
        # Dead-lettered, the row still hands back its payload for an operator's retry.
        await outbox.dead(due_fhir[0].id, 3, "HTTP 500", "server error")
        await outbox.retry([due_fhir[0].id])
        assert (await outbox.due("ehr", "fhir", 0, 10))[0].payload == due_fhir[0].payload
    finally:
        await inbox.close()
    assert canaries_in_files(tmp_path, (*ADT_CANARIES, b"qzxcanaryfam")) == {}


async def test_a_sealed_inbox_row_moved_onto_another_fails_loudly(tmp_path: Path) -> None:
    inbox = await SqliteInbox.open(tmp_path / "inbox.db", codec=codec(K1))
    try:
        first = await inbox.accept(_inbound(b"MSH|first", "C-1", routes=("ehr",)))
        second = await inbox.accept(_inbound(b"MSH|second", "C-2", routes=("ehr",)))
        for column in ("raw", "bundle"):
            await inbox.connection.execute(
                f"UPDATE inbox SET {column} = (SELECT {column} FROM inbox WHERE id = ?) "
                "WHERE id = ?", (first.inbox_id, second.inbox_id))
        with pytest.raises(SealError):
            await inbox.get(second.inbox_id)
        assert (await inbox.get(first.inbox_id) or (None, b""))[1] == b"MSH|first"
        # The outbox hands the moved row over without a payload (it is not sent, and is
        # dead-lettered), and the row before it as it was: one row never stalls the queue.
        due = await SqliteOutbox(inbox.connection, inbox.codec).due("ehr", "mllp", 0, 10)
        assert [row.payload for row in due] == [b"MSH|first", None]
    finally:
        await inbox.close()


async def test_the_fhir_store_seals_bodies_and_searches_blind_indexes(tmp_path: Path) -> None:
    registry = search_registry(load_settings(None, environ={}))
    store = await SqliteFhirStore.open(tmp_path / "fhir.db", registry.index, codec=codec(K1),
                                       string_groups=registry.string_groups())
    try:
        created = await store.transact([WriteRequest("POST", "Patient", resource=patient(
            "MRNFHIRCANARY", family="Qzxfhircanary", given=["Wqvcanarygiv"]))])
        stored = created[0].stored
        assert stored is not None
        updated = patient("MRNFHIRCANARY", family="Qzxfhircanary", given=["Other"],
                          id=stored.id)
        await store.transact([WriteRequest("PUT", "Patient", id=stored.id, resource=updated)])

        async def ids(*matches: TokenMatch | StringMatch) -> list[str]:
            page = await store.search(SearchQuery("Patient", (tuple(matches),)))
            return [r.id for r in page.resources]

        assert await ids(TokenMatch("identifier", None, "MRNFHIRCANARY")) == [stored.id]
        assert await ids(StringMatch("family", "qzxfhir")) == [stored.id]  # starts-with
        assert await ids(StringMatch("family", "qzxfhircanary")) == [stored.id]
        assert await ids(StringMatch("family", "Qzxfhircanary", "exact")) == [stored.id]
        assert await ids(StringMatch("family", "qzxfhircanary", "exact")) == []
        assert await ids(StringMatch("family", "zxf")) == []
        assert await ids(TokenMatch("identifier", None, "MRNOTHER")) == []
        with pytest.raises(SearchUnsupported, match="family:contains"):
            await ids(StringMatch("family", "fhirc", "contains"))
        first = await store.vread("Patient", stored.id, 1)
        assert first is not None and b"Wqvcanarygiv" in first.body
    finally:
        await store.close()
    assert canaries_in_files(tmp_path, (b"mrnfhircanary", b"qzxfhircanary",
                                        b"wqvcanarygiv")) == {}
    with sqlite3.connect(tmp_path / "fhir.db") as db:
        bodies = [bytes(b) for (b,) in db.execute("SELECT body FROM fhir_version")]
    assert len(bodies) == 2 and all(sealed_key_id(b) == "k1" for b in bodies)


# Families around the 8 prefix rows a sealed string gets (blinding.PREFIX_ROWS): longer
# starts-with values are checked on the opened candidates, and must find exactly what the
# plaintext store's LIKE finds.
_LONG = {"A": ("Qzxfhirlongalpha", ["Wqvfirst"]), "B": ("Qzxfhirlongbeta", []),
         "C": ("Qzxfhirl", []), "D": ("Qzxfhirlo", ["Qzxfhirlongalpha"])}
_LONG_SEARCHES = [  # (clauses: each a tuple of (param, value)), the letters found
    ((("family", "qzxfhirlonga"),), "A"),
    ((("family", "qzxfhirlong"),), "AB"),
    ((("family", "qzxfhirl"),), "ABCD"),
    ((("family", "qzxfhirlo"),), "ABD"),
    ((("family", "qzxfhirlongalphaz"),), ""),
    ((("family", "qzxfhirlonga"), ("family", "qzxfhirlongb")), "AB"),
    ((("family", "qzxfhirlonga"), ("family", "qzxfhirl")), "ABCD"),
    ((("name", "qzxfhirlongalpha"),), "AD"),
    ((("family", "qzxfhirlo"),), (("given", "wqvfirst"),), "A"),
]


def _old_string_rows(db: sqlite3.Connection, sealed: SealedCodec) -> None:
    """The string rows as stores sealed before PREFIX_ROWS wrote them: a row for each
    prefix up to 32 characters and one for the whole text."""
    db.execute("DELETE FROM fhir_string")
    registry = search_registry(load_settings(None, environ={}))
    for resource_type, id_, body in db.execute(
            "SELECT type, id, body FROM fhir_resource").fetchall():
        document = json.loads(sealed.open(bytes(body), fhir_context(resource_type, id_, 1)))
        for entry in registry.index(resource_type, document):
            if not isinstance(entry, StringIndex):
                continue
            rows = [(sealed.blind(entry.normalized, "prefix"), sealed.blind(entry.exact,
                                                                           "exact"))]
            prefixes = sealed.blind_prefixes(entry.normalized, "prefix", 32)
            rows += [(p, "") for p in prefixes[:len(entry.normalized) - 1]]
            db.executemany(INDEX_INSERTS[StringIndex],
                           [(resource_type, id_, entry.param, n, e) for n, e in rows])


@pytest.mark.parametrize("kind", ["plain", "sealed", "sealed, rows written before"])
async def test_long_starts_with_values_find_on_a_sealed_store_what_they_find_in_clear(
        tmp_path: Path, kind: str) -> None:
    registry = search_registry(load_settings(None, environ={}))
    sealed = codec(K1)
    store = await SqliteFhirStore.open(tmp_path / "fhir.db", registry.index,
                                       codec=PLAIN if kind == "plain" else sealed,
                                       string_groups=registry.string_groups())
    try:
        letter = {}
        for name, (family, given) in _LONG.items():
            done = await store.transact([WriteRequest("POST", "Patient", resource=patient(
                f"MRN{name}", family=family, given=given))])
            assert done[0].stored is not None
            letter[done[0].stored.id] = name
    finally:
        await store.close()
    if kind == "sealed, rows written before":
        with sqlite3.connect(tmp_path / "fhir.db") as db:
            _old_string_rows(db, sealed)
    store = await SqliteFhirStore.open(tmp_path / "fhir.db", registry.index,
                                       codec=PLAIN if kind == "plain" else sealed,
                                       string_groups=registry.string_groups())
    try:
        for *clauses, expected in _LONG_SEARCHES:
            query = SearchQuery("Patient", tuple(tuple(StringMatch(p, v) for p, v in clause)
                                                 for clause in clauses))
            page = await store.search(query, total=True)
            assert "".join(sorted(letter[r.id] for r in page.resources)) == expected, clauses
            assert page.total == len(expected) == await store.count(query)
        # Paging and the total count only what the check kept.
        query = SearchQuery("Patient", ((StringMatch("family", "qzxfhirlo"),),),
                            sort=(SortKey("_id"),), count=2, offset=1)
        page = await store.search(query, total=True)
        assert page.total == 3
        assert [r.id for r in page.resources] == sorted(
            i for i, n in letter.items() if n in "ABD")[1:]
        # A conditional create on a long value: found when one matches, 412 when two do.
        one = SearchQuery("Patient", ((StringMatch("family", "qzxfhirlongbeta"),),))
        again = await store.transact([WriteRequest("POST", "Patient", resource=patient(
            "MRNE", family="Qzxfhirlongbeta"), condition=one)])
        assert again[0].status == 200 and letter[again[0].stored.id] == "B"  # type: ignore[union-attr]
        two = SearchQuery("Patient", ((StringMatch("family", "qzxfhirlong"),),))
        with pytest.raises(WriteConflict) as refused:
            await store.transact([WriteRequest("POST", "Patient", resource=patient(
                "MRNF", family="Qzxfhirlongbeta"), condition=two)])
        assert refused.value.status == 412
    finally:
        await store.close()
