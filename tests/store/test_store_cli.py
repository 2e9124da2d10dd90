"""`isthmus store status|migrate|copy` against a real PostgreSQL, and the gateway started
on the copy of an embedded deployment: the same ACK for a resend, the same FHIR history,
an audit chain that verifies."""

from __future__ import annotations

import asyncio
import re
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from conftest import MllpPeer, message, segments, with_control_id, with_fields
from gateway.app.audit import audit_keys
from gateway.app.state import APPLIER
from gateway.app.tables import search_registry
from gateway.hl7 import parse_message
from gateway.ingest.replay import patient_key
from gateway.store.data_keys import read_marker
from gateway.store.fhir import WriteRequest
from gateway.store.pg.connect import PgSpec, open_pool
from gateway.store.pg.fhir import PgFhirStore
from gateway.store.pg.migrate import migrate
from gateway.store.pg.schema import MIGRATIONS
from gateway.store.sealing import is_sealed
from support import builders, postgres
from support.audit import run_cli, settings_for
from support.fake_ehr import FakeEhr
from support.fhir import fhir_session, start_fhir_gateway
from support.wait import eventually

ADT = message("adt_a01.hl7")


@pytest.fixture
def schema(monkeypatch: pytest.MonkeyPatch) -> Iterator[PgSpec]:
    """A schema name nobody made yet, named in the environment the CLI reads."""
    postgres.require()
    spec = PgSpec(postgres.URL, schema=f"t_{secrets.token_hex(6)}")
    monkeypatch.setenv("ISTHMUS_STORE__BACKEND", "postgresql")
    monkeypatch.setenv("ISTHMUS_STORE__URL", spec.url)
    monkeypatch.setenv("ISTHMUS_STORE__SCHEMA", spec.schema)
    yield spec
    asyncio.run(postgres.drop_schema(spec))


def test_migrate_dry_run_then_migrate_then_status(schema: PgSpec) -> None:
    count = len(MIGRATIONS)
    code, out, _ = run_cli("store", "status")
    assert code == 0 and f"schema {schema.schema} at " in out
    assert f"version 0, {count} pending" in out
    code, out, _ = run_cli("store", "migrate", "--dry-run")
    assert code == 0 and out.startswith("would apply 1: ") and f"would apply {count}: " in out
    code, out, _ = run_cli("store", "status")
    assert f"version 0, {count} pending" in out  # the dry run changed nothing
    code, out, _ = run_cli("store", "migrate")
    assert code == 0 and out.startswith("applied 1: ") and f"applied {count}: " in out
    code, out, _ = run_cli("store", "status")
    assert f"version {count}, 0 pending" in out and "applied 20" in out
    code, out, _ = run_cli("store", "migrate")
    assert code == 0 and "is up to date" in out


def test_instances_starting_together_migrate_once(schema: PgSpec) -> None:
    async def together() -> list[int]:
        results = await asyncio.gather(*(migrate(schema) for _ in range(5)))
        return [len(applied) for applied in results]

    assert sorted(asyncio.run(together())) == [0, 0, 0, 0, len(MIGRATIONS)]


def test_store_commands_say_what_is_wrong_in_one_line(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ISTHMUS_STORE__BACKEND", raising=False)
    # Embedded: the status is the data dir's encryption state.
    code, out, _ = run_cli("store", "status", "--data-dir", str(tmp_path / "none"))
    assert code == 0 and out.startswith("encryption: off")
    code, _, err = run_cli("store", "copy", "--from", str(tmp_path), "--to", postgres.URL)
    assert code == 2 and "--from takes sqlite://DIR" in err
    code, _, err = run_cli("store", "copy", "--from", f"sqlite://{tmp_path}",
                           "--to", "mysql://db")
    assert code == 2 and "is not a PostgreSQL URL" in err
    monkeypatch.setenv("ISTHMUS_STORE__BACKEND", "postgresql")
    monkeypatch.setenv("ISTHMUS_STORE__URL", "postgresql://postgres@127.0.0.1:1/none")
    code, _, err = run_cli("store", "status")
    assert code == 1 and err.startswith("isthmus store status: cannot connect to "
                                        "postgresql://postgres@127.0.0.1:1/none")


async def test_copy_refuses_a_sealed_data_dir_without_its_keys_in_one_line(
        schema: PgSpec, tmp_path: Path) -> None:
    embedded = tmp_path / "sealed"
    gateway = await start_fhir_gateway(embedded)  # new data dirs are sealed by default
    await gateway.runner.cleanup()
    (embedded / "keys" / "store-data.keys").rename(tmp_path / "elsewhere.keys")
    code, out, err = run_cli("store", "copy", "--from", f"sqlite://{embedded}",
                             "--to", schema.url)
    assert code == 1 and err.count("\n") == 1 and "key" in err and out == ""
    assert "nothing was copied" in err


async def test_copy_opens_a_sealed_data_dir_and_the_copy_serves_it(
        schema: PgSpec, tmp_path: Path) -> None:
    """A sealed data dir (the default) moves to PostgreSQL in plain: messages, Bundles and
    resources opened with its keys, patient keys and search rows made again; the copy
    delivers the pending rows (Bundles opened), finds patients by identifier and name,
    keeps each patient's order after new messages, and its audit chain verifies."""
    embedded = tmp_path / "sealed"
    down = {"name": "ehr", "kind": "fhir", "base_url": "http://127.0.0.1:1/fhir",
            "max_attempts": 1000, "backoff_base": 0.05, "retry_max_delay": 0.2}
    route = [{"match": {"message": "ADT^*"}, "to": ["ehr", "local"]}]
    gateway = await start_fhir_gateway(embedded, backends=[down], routes=route)
    sent = [with_fields(with_control_id(ADT, f"SEALED-{n}"), "PID",
                        {3: f"MRN-{n % 2}^^^SYNTHHOSP^MR"}) for n in range(4)]
    try:
        peer = await MllpPeer.open(gateway.mllp_port)
        for raw in sent:
            assert segments(await peer.request(raw))["MSA"][0][1] == "AA"
        await peer.close()
        await gateway.app[APPLIER].drain()
    finally:
        await gateway.runner.cleanup()
    assert read_marker(embedded) is not None
    connection = sqlite3.connect(embedded / "inbox.db")
    assert all(is_sealed(raw) for (raw,) in connection.execute("SELECT raw FROM inbox"))
    connection.close()

    code, out, err = run_cli("store", "copy", "--from", f"sqlite://{embedded}")
    assert code == 0, err
    assert "sealed values opened" in out and "4 inbox messages, 4 outbox rows" in out

    database = await asyncpg.connect(schema.url)
    try:
        await database.execute(f'SET search_path = "{schema.schema}"')
        stored = await database.fetch("SELECT raw, patient_key FROM inbox ORDER BY id")
        assert [bytes(r[0]) for r in stored] == sent  # plain, byte for byte
        keys = [patient_key(parse_message(raw)) for raw in sent]
        assert [r[1] for r in stored] == keys and keys[0] != keys[1]
        outbox = await database.fetch("SELECT patient_key FROM outbox ORDER BY id")
        assert [r[0] for r in outbox] == keys
        assert await database.fetchval(
            "SELECT count(*) FROM fhir_token WHERE param = 'identifier' AND code = 'MRN-1'")
        # The search rows made again name their own resource by its (copied) rid.
        assert not await database.fetchval(
            "SELECT count(*) FROM fhir_token x LEFT JOIN fhir_resource r ON r.rid = x.rid "
            "WHERE x.param = 'identifier' AND (r.rid IS NULL OR r.type <> x.type OR NOT "
            "r.resource->'identifier' @> jsonb_build_array(jsonb_build_object('value', "
            "x.code)))")
        assert not await database.fetchval(
            "SELECT count(*) FROM fhir_resource WHERE resource IS NULL AND deleted = 0")
    finally:
        await database.close()

    keys_dir = embedded / "keys"
    async with FakeEhr() as ehr:
        up = {**down, "base_url": ehr.url}
        moved = await start_fhir_gateway(
            tmp_path / "instance", backends=[up], routes=route, **{
                "store.backend": "postgresql", "store.url": schema.url,
                "store.schema": schema.schema, "audit.key_file": keys_dir / "audit-data.keys",
                "audit.signing_key_file": keys_dir / "audit-signing.pem",
                "forward.poll_interval": 0.1})
        try:
            peer = await MllpPeer.open(moved.mllp_port)
            later = with_fields(with_control_id(ADT, "SEALED-4"), "PID",
                                {3: "MRN-0^^^SYNTHHOSP^MR"})
            assert segments(await peer.request(later))["MSA"][0][1] == "AA"
            await peer.close()
            await eventually(lambda: len(ehr.transactions) >= 5, timeout=30,
                             what="the copied rows and the new one delivered")
            # Each Bundle opened from the copy (its message and patient in it), each
            # patient's in order, the new message after the copied ones.
            delivered = list(dict.fromkeys(t.body for t in ehr.transactions))
            for mrn, expected in (("MRN-0", [0, 2, 4]), ("MRN-1", [1, 3])):
                bodies = [body for body in delivered if mrn.encode() in body]
                assert [int(re.findall(rb"SEALED-(\d)", body)[0]) for body in bodies] == (
                    expected)
            async with fhir_session(moved) as http:
                for query in ("identifier=MRN-1", "family=CANARYFAMILY"):
                    async with http.get(f"/fhir/Patient?{query}") as response:
                        assert response.status == 200
                        assert (await response.json()).get("entry"), query
        finally:
            await moved.runner.cleanup()
    code, out, err = run_cli("audit", "--data-dir", str(embedded), "verify")
    assert code == 0, out + err
    assert out.startswith("audit trail intact: ")


async def test_copy_moves_an_embedded_deployment_without_losing_anything(
        schema: PgSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    embedded = tmp_path / "var"
    # A plaintext data dir: copied row for row (a sealed one: the test above).
    gateway = await start_fhir_gateway(embedded, **{"encryption.enabled": False})
    peer = await MllpPeer.open(gateway.mllp_port)
    acks = {}
    for n in range(5):
        raw = with_control_id(ADT, f"COPY-{n}")
        acks[raw] = await peer.request(raw)
    await peer.close()
    await gateway.app[APPLIER].drain()
    async with fhir_session(gateway) as http, http.get("/fhir/Patient") as response:
        patients = (await response.json())["entry"]
    await gateway.runner.cleanup()

    code, out, err = run_cli("store", "copy", "--from", f"sqlite://{embedded}")
    assert code == 0, err
    assert out.startswith(f"copied {embedded} to schema {schema.schema}")
    assert "5 inbox messages" in out
    code, out, err = run_cli("store", "copy", "--from", f"sqlite://{embedded}")
    assert code == 1 and "not empty" in err  # never merged twice

    keys = embedded / "keys"
    moved = await start_fhir_gateway(
        tmp_path / "instance", **{
            "store.backend": "postgresql", "store.url": schema.url,
            "store.schema": schema.schema, "audit.key_file": keys / "audit-data.keys",
            "audit.signing_key_file": keys / "audit-signing.pem"})
    try:
        peer = await MllpPeer.open(moved.mllp_port)
        for raw, ack in acks.items():
            assert await peer.request(raw) == ack  # a resend: the stored ACK, not stored
        fresh = await peer.request(with_control_id(ADT, "COPY-NEW"))
        assert segments(fresh)["MSA"][0][1] == "AA"
        await peer.close()
        assert await moved.inbox.count() == 6
        patient_id = patients[0]["resource"]["id"]
        async with fhir_session(moved) as http, http.get(
                f"/fhir/Patient/{patient_id}/_history") as response:
            assert response.status == 200
            assert (await response.json())["total"] >= 1
    finally:
        await moved.runner.cleanup()
    code, out, err = run_cli("audit", "--data-dir", str(embedded), "verify")
    assert code == 0, out + err
    assert out.startswith("audit trail intact: ")


async def test_outbox_commands_work_on_the_database(schema: PgSpec) -> None:
    from gateway.store.pg.connect import open_pool
    from gateway.store.pg.inbox import PgInbox
    from gateway.store.pg.outbox import PgOutbox
    from support.backends import inbound

    await migrate(schema)
    pool = await open_pool(schema)
    try:
        inbox = await PgInbox.open(pool)
        for n in range(3):
            await inbox.accept(inbound(f"CLI-{n}", routes=("ehr",), patient_key="p"))
        await inbox.close()
        gateway = PgOutbox(pool, schema, "gateway")
        [first, *_] = await gateway.due("ehr", "mllp", 0, 10)
        await gateway.dead(first.id, 12, "ACK AE", "refused")
        code, out, err = run_cli("outbox", "list", "--status", "dead")
        assert code == 0, err
        assert "CLI-0" in out and "CLI-1" not in out
        code, out, _ = run_cli("outbox", "show", str(first.id))
        assert code == 0 and "holds: 2 later deliveries" in out
        code, out, _ = run_cli("outbox", "retry", str(first.id))
        assert code == 0
        assert await gateway.count_pending("ehr") == 3
    finally:
        await pool.close()


async def test_inbox_commands_work_on_the_database(schema: PgSpec, tmp_path: Path) -> None:
    from gateway.app.audit import audit_keys
    from gateway.store.pg.connect import open_pool
    from gateway.store.pg.inbox import PgInbox
    from support.audit import settings_for
    from support.backends import inbound

    await migrate(schema)
    audit_keys(settings_for(tmp_path / "var"), create=True)  # the CLI records its reads
    pool = await open_pool(schema)
    try:
        inbox = await PgInbox.open(pool)
        stored = await inbox.accept(inbound("INBOX-CLI-1", b"MSH|^~\\&|A|B", b"ACK-1"))
        await inbox.close()
        code, out, err = run_cli("inbox", "--data-dir", str(tmp_path / "var"), "list")
        assert code == 0, err
        assert "INBOX-CLI-1" in out
        code, out, err = run_cli("inbox", "--data-dir", str(tmp_path / "var"), "show",
                                 str(stored.inbox_id))
        assert code == 0, err
        assert "ACK-1" in out
        code, _, err = run_cli("inbox", "--data-dir", str(tmp_path / "var"), "show", "999")
        assert code == 1 and "no message with id 999" in err
        records = await pool.fetchval(
            f'SELECT count(*) FROM "{schema.schema}".audit_record')
        assert records == 1  # the read is on record in the database's chain
    finally:
        await pool.close()


def test_serve_says_in_one_line_why_it_cannot_start_on_the_database(
        schema: PgSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli("serve", "--data-dir", str(tmp_path / "a"), "--mllp-port", "0",
                           "--http-port", "0")
    # No audit keys configured: a PostgreSQL deployment generates none (shared chain).
    assert code == 1 and "every instance needs the same audit keys" in err
    monkeypatch.setenv("ISTHMUS_STORE__URL", "postgresql://u:pw@127.0.0.1:1/db")
    code, _, err = run_cli("serve", "--data-dir", str(tmp_path / "b"), "--mllp-port", "0",
                           "--http-port", "0")
    assert code == 1
    assert err.strip().splitlines()[-1] == ("isthmus: the store cannot be opened: cannot "
                                            "connect to postgresql://u@127.0.0.1:1/db: "
                                            "ConnectionRefusedError")


async def test_fhir_merge_works_on_the_database_and_is_on_record(
        schema: PgSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`isthmus fhir merge` with store.backend = "postgresql": the merge in the shared
    database (no data dir to stop), its access in the database's audit trail."""
    keys = tmp_path / "keys-home"
    audit_keys(settings_for(keys), create=True)
    monkeypatch.setenv("ISTHMUS_AUDIT__KEY_FILE", str(keys / "keys" / "audit-data.keys"))
    monkeypatch.setenv("ISTHMUS_AUDIT__SIGNING_KEY_FILE",
                       str(keys / "keys" / "audit-signing.pem"))
    await migrate(schema)
    pool = await open_pool(schema)
    try:
        store = await PgFhirStore.open(pool, search_registry(settings_for(keys)).index)
        made = await store.transact([
            WriteRequest("POST", "Patient", resource=builders.patient("MERGE-OLD")),
            WriteRequest("POST", "Patient", resource=builders.patient("MERGE-NEW"))])
        old, new = (o.stored.id for o in made  # type: ignore[union-attr]
                    if o.stored is not None)
        [seen] = await store.transact([WriteRequest(
            "POST", "Observation", resource=builders.observation(f"Patient/{old}"))])
        assert seen.stored is not None
        code, out, err = run_cli("fhir", "merge", f"Patient/{old}", f"Patient/{new}")
        assert code == 0, err
        assert out.startswith(f"merged Patient/{old} into Patient/{new}: references moved "
                              "in 1 resources")
        gone = await store.read("Patient", old)
        moved = await store.read("Observation", seen.stored.id)
        assert gone is not None and moved is not None
        assert b'"replaced-by"' in gone.body and f"Patient/{new}".encode() in moved.body
        code, _, err = run_cli("fhir", "merge", "Patient/nobody", f"Patient/{new}")
        assert code == 1 and "not a current record" in err and "Traceback" not in err
        await store.close()
        records = await pool.fetchval("SELECT count(*) FROM audit_record")
        assert records == 4  # each call recorded both records' access first
    finally:
        await pool.close()
    code, out, err = run_cli("audit", "--data-dir", str(keys), "verify")
    assert code == 0, out + err
