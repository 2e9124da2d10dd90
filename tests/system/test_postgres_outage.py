"""The database going away mid-stream and coming back (a TCP proxy in front of PostgreSQL
taken down and brought back): no AA without a commit (messages are answered AR, to be
resent), FHIR answers 503 with Retry-After, /readyz says not ready, and the gateway
recovers by itself, no restart; what was AA'd is stored exactly once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from conftest import MllpPeer, RunningGateway, message, segments, with_control_id
from gateway.app.audit import audit_keys
from gateway.store.pg.connect import PgSpec
from support import postgres
from support.audit import settings_for
from support.fhir import fhir_session, start_fhir_gateway
from support.tcp_proxy import TcpProxy
from support.wait import eventually

ADT = message("adt_a01.hl7")


@pytest.fixture
async def behind_proxy(tmp_path: Path) -> AsyncIterator[tuple[RunningGateway, TcpProxy,
                                                               PgSpec]]:
    spec = await postgres.new_schema()
    target = urlsplit(spec.url)
    proxy = await TcpProxy(target.hostname or "127.0.0.1", target.port or 5432).start()
    url = spec.url.replace(f"{target.hostname}:{target.port or 5432}",
                           f"127.0.0.1:{proxy.port}")
    keys = tmp_path / "keys-home"
    audit_keys(settings_for(keys), create=True)
    running = await start_fhir_gateway(tmp_path / "var", **{
        "store.backend": "postgresql", "store.url": url, "store.schema": spec.schema,
        "store.connect_timeout": 1.0, "store.statement_timeout": 3.0,
        "audit.key_file": keys / "keys" / "audit-data.keys",
        "audit.signing_key_file": keys / "keys" / "audit-signing.pem"})
    try:
        yield running, proxy, spec
    finally:
        await proxy.start()  # let the shutdown commit what it still holds
        await running.runner.cleanup()
        await proxy.stop()
        await postgres.drop_schema(spec)


async def ack_code(peer: MllpPeer, control_id: str) -> str:
    return segments(await peer.request(with_control_id(ADT, control_id),
                                       timeout=30))["MSA"][0][1]


@pytest.mark.slow
async def test_no_aa_without_a_commit_and_recovery_without_a_restart(
        behind_proxy: tuple[RunningGateway, TcpProxy, PgSpec]) -> None:
    running, proxy, spec = behind_proxy
    peer = await MllpPeer.open(running.mllp_port)
    answers: dict[str, str] = {}
    for n in range(5):
        answers[f"UP-{n}"] = await ack_code(peer, f"UP-{n}")
    assert set(answers.values()) == {"AA"}

    await proxy.stop()
    for n in range(5):
        answers[f"DOWN-{n}"] = await ack_code(peer, f"DOWN-{n}")
    assert all(answers[f"DOWN-{n}"] == "AR" for n in range(5))  # resend later
    async with fhir_session(running) as http:
        async with http.get("/fhir/Patient") as response:
            assert response.status == 503
            assert response.headers["Retry-After"].isdigit()
        async with http.get("/readyz") as response:
            assert response.status == 503

    await proxy.start()

    async def accepted_again() -> bool:
        return await ack_code(peer, "DOWN-0") == "AA"

    await eventually(accepted_again, timeout=30, what="AA once the database is back")
    for n in range(1, 5):
        answers[f"DOWN-{n}"] = await ack_code(peer, f"DOWN-{n}")
    assert all(answers[f"DOWN-{n}"] == "AA" for n in range(1, 5))
    await peer.close()
    async with fhir_session(running) as http, http.get("/readyz") as response:
        assert response.status == 200

    connection = await asyncpg.connect(spec.url)
    try:
        rows = await connection.fetch(
            f'SELECT control_id, count(*) FROM "{spec.schema}".inbox GROUP BY control_id')
    finally:
        await connection.close()
    assert {str(r[0]): int(r[1]) for r in rows} == {key: 1 for key in answers}
