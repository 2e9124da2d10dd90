"""`isthmus store status|migrate|copy` against a real PostgreSQL, and the gateway started
on the copy of an embedded deployment: the same ACK for a resend, the same FHIR history,
an audit chain that verifies."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import MllpPeer, message, segments, with_control_id
from gateway.app import APPLIER
from gateway.store.pg.connect import PgSpec
from gateway.store.pg.migrate import migrate
from gateway.store.pg.schema import MIGRATIONS
from support import postgres
from support.audit import run_cli
from support.fhir import fhir_session, start_fhir_gateway

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
    code, out, _ = run_cli("store", "status")
    latest = len(MIGRATIONS)
    assert code == 0 and f"schema {schema.schema} at " in out and \
        f"version 0, {latest} pending" in out
    code, out, _ = run_cli("store", "migrate", "--dry-run")
    assert code == 0 and out.startswith("would apply 1: ")
    code, out, _ = run_cli("store", "status")
    assert f"version 0, {latest} pending" in out  # the dry run changed nothing
    code, out, _ = run_cli("store", "migrate")
    assert code == 0 and out.startswith("applied 1: ")
    code, out, _ = run_cli("store", "status")
    assert f"version {latest}, 0 pending" in out and "applied 20" in out
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


async def test_copy_refuses_a_sealed_data_dir_in_one_line(
        schema: PgSpec, tmp_path: Path) -> None:
    embedded = tmp_path / "sealed"
    gateway = await start_fhir_gateway(embedded)  # new data dirs are sealed by default
    await gateway.runner.cleanup()
    code, out, err = run_cli("store", "copy", "--from", f"sqlite://{embedded}",
                             "--to", schema.url)
    assert code == 1 and err.count("\n") == 1 and "sealed" in err and out == ""


async def test_copy_moves_an_embedded_deployment_without_losing_anything(
        schema: PgSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    embedded = tmp_path / "var"
    # A copy takes a plaintext data dir (a sealed one is refused, see the test below).
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
    from gateway.app import audit_keys
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
