"""Forwarding end to end: HL7 in over MLLP, out to a remote FHIR server or MLLP system.

A real gateway (in this event loop) with [[backends]] and [[routes]] configured, a fake EHR
(aiohttp on 127.0.0.1) and a fake downstream MLLP system. What is checked is what the
issue promises: every accepted write arrives exactly once, in per-patient order, after an
outage; the sender gets AR rather than an ACK for what the outbox cannot hold; the span
tree of one message runs from the MLLP edge to the backend attempt, without PHI.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import GatewayProcess, MllpPeer, RunningGateway, message, segments, start_gateway
from gateway.app.state import FORWARDING
from gateway.forward.outbox import Dispatcher
from gateway.store.inbox import ROUTED
from gateway.store.outbox import SqliteOutbox
from gateway.telemetry import configure
from support.fake_ehr import FakeEhr
from support.fake_mllp import FakeMllp
from support.fhir import fhir_session, start_fhir_gateway
from support.pki import Pki
from support.wait import eventually

ADT = message("adt_a01.hl7")
CANARY_ADT = message("canary_adt_a01.hl7")
CANARIES = ("QZXCANARYFAM", "WQVCANARYGIV", "MRNCANARY77123", "qzx.canary", "19110317",
            "0173344", "Qzxcanary Lane")


def _fhir_backend(fake: FakeEhr, **extra: Any) -> dict[str, Any]:
    return {"name": "ehr", "kind": "fhir", "base_url": fake.url, "backoff_base": 0.02,
            "retry_max_delay": 0.3, "breaker_reset": 0.2, "max_attempts": 1000, **extra}


def _dispatcher(running: RunningGateway) -> Dispatcher:
    dispatcher = running.app[FORWARDING].dispatcher
    assert dispatcher is not None
    return dispatcher


def _adt(patient: int, sequence: int) -> bytes:
    """adt_a01.hl7 for synthetic patient `patient`, control id naming both numbers."""
    text = ADT.replace(b"MRN-100001", f"MRN-{patient:06d}".encode())
    return text.replace(b"CTRL-ADT-0001", f"CTRL-P{patient:03d}-{sequence:05d}".encode())


async def _send_all(port: int, messages: list[bytes], window: int = 64) -> list[str]:
    """Send over one connection, `window` frames in flight; the ACK codes in order."""
    peer = await MllpPeer.open(port)
    codes: list[str] = []
    try:
        for start in range(0, len(messages), window):
            chunk = messages[start:start + window]
            for item in chunk:
                await peer.send(item)
            for _ in chunk:
                codes.append(segments(await peer.reply(timeout=30))["MSA"][0][1])
    finally:
        await peer.close()
    return codes


async def test_adt_reaches_the_fhir_backend_once_and_the_local_store(tmp_path: Path) -> None:
    async with FakeEhr() as fake:
        running = await start_gateway(
            tmp_path / "var", backends=[_fhir_backend(fake)],
            routes=[{"match": {"message": "ADT^*"}, "to": ["ehr", "local"]}])
        try:
            peer = await MllpPeer.open(running.mllp_port)
            assert segments(await peer.request(ADT))["MSA"][0][1] == "AA"
            # The same control id again is a duplicate: same ACK, no second delivery.
            assert segments(await peer.request(ADT))["MSA"][0][1] == "AA"
            await peer.close()
            await _dispatcher(running).drain(10)
            assert len(fake.transactions) == 1
            received = fake.transactions[0]
            assert received.request_id == "isthmus-outbox-1"
            assert received.bundle["type"] == "transaction"
            types = {e["resource"]["resourceType"] for e in received.bundle["entry"]}
            assert {"Patient", "Encounter", "Provenance"} <= types
            entries = await running.inbox.list()
            assert [e.status for e in entries] == ["applied"]
        finally:
            await running.runner.cleanup()


async def test_a_route_without_local_leaves_the_store_alone(tmp_path: Path) -> None:
    async with FakeEhr() as fake:
        running = await start_fhir_gateway(
            tmp_path / "var", backends=[_fhir_backend(fake)],
            routes=[{"match": {"message": "ADT^*", "sender": "SYNTH*"}, "to": ["ehr"]}])
        try:
            codes = await _send_all(running.mllp_port, [ADT])
            assert codes == ["AA"]
            await _dispatcher(running).drain(10)
            assert len(fake.transactions) == 1
            assert [e.status for e in await running.inbox.list()] == [ROUTED]
            # Nothing was applied locally: the local store holds no Patient.
            async with fhir_session(running) as http, http.get("/fhir/Patient") as answer:
                assert answer.status == 200
                assert (await answer.json()).get("entry", []) == []
        finally:
            await running.runner.cleanup()


async def test_results_go_to_a_downstream_mllp_system_under_our_control_id(
        tmp_path: Path) -> None:
    lab = await FakeMllp().start()
    running = await start_gateway(
        tmp_path / "var",
        backends=[{"name": "lab", "kind": "mllp", "host": "127.0.0.1", "port": lab.port}],
        routes=[{"match": {"message": "ADT^A01"}, "to": ["lab"]}])
    try:
        assert await _send_all(running.mllp_port, [ADT, _adt(2, 1)]) == ["AA", "AA"]
        await _dispatcher(running).drain(10)
        assert lab.control_ids == ["ISM00000000000000001", "ISM00000000000000002"]
        # Everything but MSH-10 is passed on as received.
        assert lab.received[0].raw.replace(b"ISM00000000000000001", b"CTRL-ADT-0001") == ADT
    finally:
        await running.runner.cleanup()
        await lab.stop()


async def test_a_full_outbox_answers_ar_and_keeps_what_it_accepted(tmp_path: Path) -> None:
    fake = FakeEhr()
    await fake.start()
    await fake.stop()  # the EHR is down from the start
    running = await start_gateway(
        tmp_path / "var", backends=[_fhir_backend(fake, outbox_cap=3)],
        routes=[{"match": {"message": "ADT^*"}, "to": ["ehr"]}])
    try:
        codes = await _send_all(running.mllp_port, [_adt(i, 1) for i in range(5)], window=1)
        assert codes == ["AA", "AA", "AA", "AR", "AR"]
        await fake.start()
        # Rows wait out their backoff: wait for the deliveries, not just what is due now.
        await eventually(lambda: _dispatcher(running).pending("ehr") == 0, timeout=20,
                         what="delivery")
        delivered = sorted(re.search(rb"CTRL-P(\d+)", t.body).group(1)  # type: ignore[union-attr]
                           for t in fake.transactions)
        assert delivered == [b"000", b"001", b"002"]
        # Room again: the resend of a refused message is taken.
        assert await _send_all(running.mllp_port, [_adt(3, 1)]) == ["AA"]
    finally:
        await running.runner.cleanup()
        await fake.stop()


@pytest.mark.slow
async def test_5000_writes_queued_in_an_outage_arrive_exactly_once_in_patient_order(
        tmp_path: Path) -> None:
    fake = FakeEhr()
    await fake.start()
    await fake.stop()
    patients, per_patient, connections = 50, 100, 5
    running = await start_gateway(
        tmp_path / "var", backends=[_fhir_backend(fake)],
        routes=[{"match": {"message": "ADT^*"}, "to": ["ehr"]}],
        **{"audit.enabled": False})
    try:
        # Each patient's messages go over one connection, in sequence order.
        lanes: list[list[bytes]] = [[] for _ in range(connections)]
        for sequence in range(per_patient):
            for patient in range(patients):
                lanes[patient % connections].append(_adt(patient, sequence))
        results = await asyncio.gather(*(_send_all(running.mllp_port, lane)
                                         for lane in lanes))
        assert all(code == "AA" for codes in results for code in codes)
        outbox = SqliteOutbox(running.inbox.connection)
        assert await outbox.count_pending("ehr") == patients * per_patient
        await fake.start()  # the EHR comes back
        await eventually(lambda: len(fake.transactions) >= patients * per_patient, timeout=120,
                         what="the drain")
        await _dispatcher(running).drain(10)
        assert await outbox.count_pending("ehr") == 0
        bodies = [t.body for t in fake.transactions]
        ids = [t.request_id for t in fake.transactions]
        assert len(bodies) == patients * per_patient
        assert len(set(ids)) == len(ids)  # exactly once
        order: dict[int, list[int]] = defaultdict(list)
        for body in bodies:
            found = re.search(rb"CTRL-P(\d{3})-(\d{5})", body)
            assert found is not None
            order[int(found.group(1))].append(int(found.group(2)))
        assert all(order[p] == list(range(per_patient)) for p in range(patients))
    finally:
        await running.runner.cleanup()
        await fake.stop()


async def test_one_message_span_tree_reaches_the_backend_without_phi(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    exporter = InMemorySpanExporter()
    telemetry = configure("none", span_exporter=exporter)
    caplog.set_level(logging.DEBUG)
    async with FakeEhr() as fake:
        running = await start_gateway(
            tmp_path / "var", telemetry, backends=[_fhir_backend(fake)],
            routes=[{"match": {"message": "ADT^A01"}, "to": ["ehr"]}],
            **{"log.level": "debug"})
        try:
            assert await _send_all(running.mllp_port, [CANARY_ADT]) == ["CA"]  # enhanced
            await _dispatcher(running).drain(10)
        finally:
            await running.runner.cleanup()
        spans = exporter.get_finished_spans()
        root = next(s for s in spans if s.name == "mllp.message")
        trace_id = root.context.trace_id
        tree = [s for s in spans if s.context.trace_id == trace_id]
        names = {s.name for s in tree}
        assert {"mllp.message", "hl7.parse", "mapping.translate", "inbox.store",
                "audit.append", "forward.attempt"} <= names
        attempt = next(s for s in tree if s.name == "forward.attempt")
        assert attempt.parent is not None and attempt.parent.span_id == root.context.span_id
        assert attempt.attributes is not None
        assert attempt.attributes["forward.backend"] == "ehr"
        assert attempt.attributes["forward.attempt"] == 1
        assert attempt.attributes["http.response.status_code"] == 200
        # The EHR got the trace: its request's traceparent carries our trace id.
        traceparent = fake.transactions[0].traceparent
        assert traceparent is not None and f"{trace_id:032x}" in traceparent
        exported = orjson.dumps([dict(s.attributes or {}) for s in spans]).decode()
        logged = "\n".join(r.getMessage() for r in caplog.records)
        for canary in CANARIES:
            assert canary not in exported
            assert canary not in logged


async def test_plain_http_backend_is_warned_about_at_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    running = await start_gateway(tmp_path / "var", backends=[
        {"name": "far", "kind": "fhir", "base_url": "http://ehr.invalid/fhir",
         "allow_insecure_http": True}])
    await running.runner.cleanup()
    assert any("backend 'far'" in r.getMessage() and "allow_insecure_http" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow
async def test_a_crash_mid_drain_loses_nothing_and_keeps_patient_order(tmp_path: Path) -> None:
    """SIGKILL while deliveries are in flight: after the restart every accepted message
    arrives; one delivered just before the kill may arrive again, under the same
    X-Request-Id (the same outbox row), and never out of its patient's order."""
    async with FakeEhr() as fake:
        fake.delay = 0.01  # a slowish backend, so the kill lands mid-drain
        config = tmp_path / "isthmus.toml"
        config.write_text(
            f'[[backends]]\nname = "ehr"\nkind = "fhir"\nbase_url = "{fake.url}"\n'
            'backoff_base = 0.02\nretry_max_delay = 0.2\nbreaker_reset = 0.2\n'
            '[[routes]]\nmatch = { message = "ADT^*" }\nto = ["ehr"]\n'
            '[audit]\nenabled = false\n')
        patients, per_patient = 10, 30
        process = GatewayProcess(tmp_path / "var", env={"ISTHMUS_CONFIG": str(config)})
        process.start()
        try:
            lanes = [[_adt(p, s) for s in range(per_patient)] for p in range(patients)]
            results = await asyncio.gather(*(_send_all(process.mllp_port, lane, window=8)
                                             for lane in lanes))
            assert all(code == "AA" for codes in results for code in codes)
            await eventually(lambda: len(fake.transactions) >= 100, timeout=30,
                             what="some deliveries")
            process.kill()
            before = len(fake.transactions)
            assert before < patients * per_patient  # the kill came mid-drain
            process.start()
            expected = patients * per_patient
            await eventually(lambda: len({t.request_id for t in fake.transactions}) >= expected,
                             timeout=60, what="every delivery after the restart")
        finally:
            process.kill()
    arrivals: dict[int, list[int]] = defaultdict(list)
    request_ids: dict[tuple[int, int], set[str | None]] = defaultdict(set)
    for received in fake.transactions:
        found = re.search(rb"CTRL-P(\d{3})-(\d{5})", received.body)
        assert found is not None
        patient, sequence = int(found.group(1)), int(found.group(2))
        arrivals[patient].append(sequence)
        request_ids[(patient, sequence)].add(received.request_id)
    for patient in range(patients):
        firsts = list(dict.fromkeys(arrivals[patient]))
        assert firsts == list(range(per_patient))  # nothing lost, nothing reordered
        # A patient's next row goes only once the previous result is on disk, so a
        # repeat can only be its last delivery before the kill, right after itself.
        assert arrivals[patient] == sorted(arrivals[patient])
        assert len(arrivals[patient]) - per_patient <= 1
    assert all(len(ids) == 1 for ids in request_ids.values())  # same row, same id
    assert len(fake.transactions) - expected <= 8  # at most the deliveries in flight


@pytest.mark.slow
async def test_a_replayed_message_is_forwarded_to_the_fhir_backend_its_route_names(
        tmp_path: Path) -> None:
    """An unmapped message cannot go to a FHIR backend; once a site table maps it,
    `isthmus inbox replay` owes the backend its Bundle and the running gateway sends it
    (and not to the local store, which the route leaves out)."""
    from support.cli import isthmus

    unsupported = (_adt(7, 1).replace(b"ADT^A01^ADT_A01", b"ADT^A17")
                   .replace(b"EVN|A01", b"EVN|A17"))
    async with FakeEhr() as fake:
        config = tmp_path / "isthmus.toml"
        config.write_text(
            f'[[backends]]\nname = "ehr"\nkind = "fhir"\nbase_url = "{fake.url}"\n'
            '[[routes]]\nmatch = { message = "ADT^*" }\nto = ["ehr"]\n'
            '[forward]\npoll_interval = 0.1\n')
        settings = {"backends": [{"name": "ehr", "kind": "fhir", "base_url": fake.url}],
                    "routes": [{"match": {"message": "ADT^*"}, "to": ["ehr"]}],
                    "forward.poll_interval": 0.1}
        running = await start_gateway(tmp_path / "var", **settings)
        try:
            assert await _send_all(running.mllp_port, [unsupported]) == ["AA"]
            assert [e.status for e in await running.inbox.list()] == ["unsupported"]
            site = tmp_path / "site"
            site.mkdir()
            events = (Path(__file__).parents[2] / "mappings" / "events.csv").read_text()
            (site / "events.csv").write_text(events.rstrip("\n") + "\nADT^A17,ADT_A01,swap\n")
            code, out, err = await isthmus(
                "--config", str(config), "inbox", "--data-dir", str(running.data_dir),
                "replay", "--failed", env={"ISTHMUS_MAPPING__SITE_DIR": str(site)})
            assert code == 0, err
            assert out.strip() == "1 routed -> ehr"
            await eventually(lambda: len(fake.transactions) == 1, timeout=10,
                             what="the replayed delivery")
            assert b"CTRL-P007-00001" in fake.transactions[0].body
            assert [e.status for e in await running.inbox.list()] == [ROUTED]
        finally:
            await running.runner.cleanup()


async def test_an_mllp_backend_over_mtls(tmp_path: Path, pki: Pki) -> None:
    """`tls = true` with a private CA and a client certificate: delivered; the same
    backend without the certificate is refused by the peer and the row stays pending."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca)
    server.load_cert_chain(pki.server_cert, pki.server_key)
    server.verify_mode = ssl.CERT_REQUIRED
    lab = await FakeMllp(ssl_context=server).start()
    backend = {"name": "lab", "kind": "mllp", "host": "127.0.0.1", "port": lab.port,
               "tls": True, "ca_file": str(pki.ca), "read_timeout": 2, "backoff_base": 0.05}
    route = [{"match": {"message": "ADT^*"}, "to": ["lab"]}]
    try:
        running = await start_gateway(tmp_path / "a", routes=route, backends=[
            {**backend, "client_cert_file": str(pki.lab_cert),
             "client_key_file": str(pki.lab_key)}])
        try:
            assert await _send_all(running.mllp_port, [ADT]) == ["AA"]
            await eventually(lambda: len(lab.received) == 1, timeout=10,
                             what="the TLS delivery")
        finally:
            await running.runner.cleanup()
        running = await start_gateway(tmp_path / "b", routes=route, backends=[backend])
        try:
            assert await _send_all(running.mllp_port, [_adt(2, 1)]) == ["AA"]
            # Deliberate: time for a delivery that must not happen (no client certificate).
            await asyncio.sleep(0.5)
            outbox = SqliteOutbox(running.inbox.connection)
            assert await outbox.count_pending("lab") == 1
            assert len(lab.received) == 1
        finally:
            await running.runner.cleanup()
    finally:
        await lab.stop()
