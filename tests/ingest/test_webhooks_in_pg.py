"""Inbound webhooks on PostgreSQL: a gateway whose store is the shared database records
the event in its `webhook_event` table (migration 2), fetches the resource into the
database's FHIR store, and answers a replayed event id 200 without a second fetch."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from gateway.app.audit import audit_keys
from support import postgres
from support.audit import settings_for
from support.fake_ehr import FakeEhr
from support.fhir import fhir_session, start_fhir_gateway
from support.wait import eventually
from support.webhooks import WebhookSender

SECRET = b"synthetic-pg-hook-secret"


async def test_webhook_on_postgresql_is_recorded_once_and_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_HOOK_SECRET", SECRET.decode())
    spec = await postgres.new_schema()
    keys = tmp_path / "keys-home"
    audit_keys(settings_for(keys), create=True)
    try:
        async with FakeEhr() as ehr:
            ehr.seed({"resourceType": "Patient", "id": "pg-p1", "name": [{"family": "Pg"}]})
            running = await start_fhir_gateway(tmp_path / "var", **{
                "store.backend": "postgresql", "store.url": spec.url,
                "store.schema": spec.schema,
                "audit.key_file": keys / "keys" / "audit-data.keys",
                "audit.signing_key_file": keys / "keys" / "audit-signing.pem",
                "backends": [{"name": "ehr", "kind": "fhir", "base_url": ehr.url,
                              "webhook": {"secret_env": "PG_HOOK_SECRET",
                                          "event_id": "/id",
                                          "resource": "/focus/reference"}}]})
            try:
                sender = WebhookSender(running.http_url, "ehr", SECRET)
                event = {"id": "pg-evt-1", "focus": {"reference": "Patient/pg-p1"}}
                assert (await sender.send(event)).status == 202

                async def stored() -> bool:
                    async with fhir_session(running) as http, http.get(
                            "/fhir/Patient/pg-p1") as answer:
                        return answer.status == 200

                await eventually(stored, timeout=20)
                assert (await sender.send(event)).status == 200
                connection = await asyncpg.connect(spec.url,
                                                   server_settings={"search_path": spec.schema})
                try:
                    rows = await connection.fetch(
                        "SELECT event_id, status, attempts FROM webhook_event")
                finally:
                    await connection.close()
                assert [tuple(r) for r in rows] == [("pg-evt-1", "done", 1)]
                assert len(ehr.requests_to("GET", "Patient/pg-p1")) == 1
            finally:
                await running.runner.cleanup()
    finally:
        await postgres.drop_schema(spec)


