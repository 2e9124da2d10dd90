"""Inbound EHR webhooks over real HTTP: a fake EHR on 127.0.0.1 posts signed and forged
change notifications to a running gateway's /webhooks/<backend> and serves the resources
the gateway then fetches. A verified event is answered 202 and its resource appears in
the local FHIR store (read back through /fhir); a forged one is 401 and on record in the
audit trail; an event id seen before changes nothing; an EHR that is down when the
gateway fetches delays the event, never loses it, across a restart too; no PHI reaches a
log line or an answer. All data is synthetic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fhir.resources.R4B.appointment import Appointment
from fhir.resources.R4B.patient import Patient

from conftest import RunningGateway
from gateway.audit.query import AuditQuery
from gateway.audit.record import Action
from gateway.audit.sealed import parse_body
from gateway.cli import main as cli_main
from gateway.config import BackendConfig, ConfigError, InboundWebhookConfig
from gateway.edge.audit_http import AUDIT
from gateway.edge.webhooks_http import WEBHOOKS
from support.fake_ehr import FakeEhr
from support.fhir import fhir_session, start_fhir_gateway
from support.wait import eventually
from support.webhooks import WebhookSender

EHR_SECRET = b"synthetic-ehr-hook-secret-31"
SCHED_SECRET = b"synthetic-scheduling-secret-77"
CANARY = "Qzxhookcanary"
CANARY_ID = "qzxhookcanaryid9"
VENDOR_MRN = "urn:oid:2.999.77.1"
CANONICAL_MRN = "urn:isthmus:sid:mrn"
VENDOR_TABLE = f"""resource,rule,path,from,to,note
Patient,identifier-system,identifier,{VENDOR_MRN},{CANONICAL_MRN},MRN
"""


def appointment(id: str, status: str = "booked", patient: str = "Patient/p1") -> dict[str, Any]:
    return {"resourceType": "Appointment", "id": id, "status": status,
            "start": "2030-03-04T09:00:00Z", "end": "2030-03-04T09:20:00Z",
            "participant": [{"actor": {"reference": patient}, "status": "accepted"}]}


def patient(id: str, family: str = "Hookfamily") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": id, "name": [{"family": family}],
            "identifier": [{"system": VENDOR_MRN, "value": f"MRN-{id}"}]}


def changed(event_id: str, reference: str, kind: str = "resource.updated") -> dict[str, Any]:
    """The generic EHR shape (mappings/webhooks/ehr-changed.csv)."""
    return {"id": event_id, "type": kind, "occurred_at": "2030-01-01T00:00:00Z",
            "focus": {"reference": reference}}


def scheduled(event_id: str, kind: str, **data: Any) -> dict[str, Any]:
    """The scheduling platform's shape (mappings/webhooks/scheduling.csv)."""
    return {"event_id": event_id, "event_type": kind, "created_at": "2030-01-01T00:00:00Z",
            "data": data}


@dataclass
class Hooked:
    gateway: RunningGateway
    ehr: FakeEhr
    ehr_hooks: WebhookSender
    sched_hooks: WebhookSender
    config: dict[str, Any]

    async def read(self, path: str) -> tuple[int, Any]:
        async with fhir_session(self.gateway) as http, http.get(f"/fhir/{path}") as answer:
            return answer.status, await answer.json(content_type=None)

    async def stored(self, path: str) -> bool:
        return (await self.read(path))[0] == 200

    async def versions(self, path: str) -> int:
        async with fhir_session(self.gateway) as http, http.get(
                f"/fhir/{path}/_history") as answer:
            return int((await answer.json(content_type=None))["total"])

    async def events(self, status: str | None = None) -> list[Any]:
        return await self.gateway.app[WEBHOOKS].events.rows(status)


def gateway_config(ehr: FakeEhr, site: Path) -> dict[str, Any]:
    down_fast = {"max_retries": 0, "breaker_reset": 0.2, "connect_timeout": 2,
                 "read_timeout": 5}
    return {
        "mapping.site_dir": site,
        "backends": [
            {"name": "ehr", "kind": "fhir", "base_url": ehr.url, "vendor": "siteehr",
             **down_fast,
             "webhook": {"secret_env": "TEST_EHR_HOOK_SECRET", "shape": "ehr-changed",
                         "retry_max_delay": 0.3}},
            {"name": "sched", "kind": "fhir", "base_url": ehr.url, **down_fast,
             "webhook": {"secret_env": "TEST_SCHED_HOOK_SECRET",
                         "signature": "hmac-sha256-timestamp", "tolerance": 300,
                         "shape": "scheduling", "retry_max_delay": 0.3}},
            {"name": "plain", "kind": "fhir", "base_url": ehr.url},
        ]}


@pytest.fixture
async def hooked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Hooked]:
    monkeypatch.setenv("TEST_EHR_HOOK_SECRET", EHR_SECRET.decode())
    monkeypatch.setenv("TEST_SCHED_HOOK_SECRET", SCHED_SECRET.decode())
    site = tmp_path / "site"
    (site / "vendors").mkdir(parents=True)
    (site / "vendors" / "siteehr.csv").write_text(VENDOR_TABLE)
    async with FakeEhr() as ehr:
        config = gateway_config(ehr, site)
        running = await start_fhir_gateway(tmp_path / "var", **config)
        try:
            yield Hooked(running, ehr,
                         WebhookSender(running.http_url, "ehr", EHR_SECRET),
                         WebhookSender(running.http_url, "sched", SCHED_SECRET,
                                       timestamped=True), config)
        finally:
            await running.runner.cleanup()


async def notify_records(running: RunningGateway) -> list[dict[str, Any]]:
    rows = await running.app[AUDIT].search(AuditQuery(action=Action.NOTIFY))
    return [parse_body(row.body) for row in rows]


# -- verified events --------------------------------------------------------------------------


async def test_signed_event_is_answered_202_and_its_resource_lands_in_the_store(
        hooked: Hooked) -> None:
    hooked.ehr.seed(patient("p1"))
    sent = await hooked.ehr_hooks.send(changed("evt-1", "Patient/p1"))
    assert sent.status == 202
    assert sent.body["resourceType"] == "OperationOutcome"
    await eventually(lambda: hooked.stored("Patient/p1"), what="Patient/p1 stored")
    status, body = await hooked.read("Patient/p1")
    Patient.model_validate(body)
    assert body["name"][0]["family"] == "Hookfamily"
    # Through the backend's vendor table: the EHR's MRN system became the canonical one.
    assert body["identifier"][0]["system"] == CANONICAL_MRN
    assert len(hooked.ehr.requests_to("GET", "Patient/p1")) == 1
    [row] = await hooked.events()
    assert (row.status, row.kind, row.resource_type) == ("done", "resource.updated",
                                                          "Patient")
    [record] = await notify_records(hooked.gateway)
    assert record["outcome"] == "success" and record["client"] == "webhook:ehr"
    assert record["type"] == "Patient" and record["detail"] == "webhook resource.updated"
    on_record = await hooked.gateway.app[AUDIT].search(AuditQuery(
        patient="Patient/p1", action=Action.NOTIFY))
    assert len(on_record) == 1  # found by the patient, whose reference is sealed


async def test_absolute_reference_on_the_backend_base_is_fetched(hooked: Hooked) -> None:
    hooked.ehr.seed(appointment("a-abs"))
    sent = await hooked.ehr_hooks.send(changed(
        "evt-abs", f"{hooked.ehr.url}/Appointment/a-abs/_history/4", "resource.created"))
    assert sent.status == 202
    await eventually(lambda: hooked.stored("Appointment/a-abs"))


async def test_scheduling_platform_events_map_through_the_shape_table(
        hooked: Hooked) -> None:
    hooked.ehr.seed(appointment("sched-1"))
    hooked.ehr.seed(patient("sched-p"))
    booked = await hooked.sched_hooks.send(scheduled(
        "whk_1", "appointment.created", appointment={"id": "sched-1", "patient_id": "x"}))
    updated = await hooked.sched_hooks.send(scheduled(
        "whk_2", "patient.updated", patient={"id": "sched-p"}))
    assert (booked.status, updated.status) == (202, 202)
    await eventually(lambda: hooked.stored("Appointment/sched-1"))
    await eventually(lambda: hooked.stored("Patient/sched-p"))
    Appointment.model_validate((await hooked.read("Appointment/sched-1"))[1])
    kinds = {row.event_id: row.kind for row in await hooked.events()}
    assert kinds == {"whk_1": "appointment.created", "whk_2": "patient.updated"}


async def test_kinds_the_table_ignores_are_accepted_and_fetch_nothing(
        hooked: Hooked) -> None:
    sent = await hooked.sched_hooks.send(scheduled("whk_9", "reminder.sent", call={"id": "c"}))
    assert sent.status == 202
    assert await hooked.events() == []
    assert hooked.ehr.requests_to("GET") == []


async def test_an_update_event_replaces_the_local_copy(hooked: Hooked) -> None:
    hooked.ehr.seed(appointment("a-upd"))
    await hooked.ehr_hooks.send(changed("evt-u1", "Appointment/a-upd"))
    await eventually(lambda: hooked.stored("Appointment/a-upd"))
    hooked.ehr.seed(appointment("a-upd", status="cancelled"))
    assert (await hooked.ehr_hooks.send(changed("evt-u2", "Appointment/a-upd"))).status == 202

    async def cancelled() -> bool:
        return (await hooked.read("Appointment/a-upd"))[1]["status"] == "cancelled"

    await eventually(cancelled)
    assert await hooked.versions("Appointment/a-upd") == 2


# -- replays ----------------------------------------------------------------------------------


async def test_replayed_event_id_fetches_nothing_and_changes_nothing(hooked: Hooked) -> None:
    hooked.ehr.seed(appointment("a-dup"))
    first = await hooked.ehr_hooks.send(changed("evt-dup", "Appointment/a-dup"))
    assert first.status == 202
    await eventually(lambda: hooked.stored("Appointment/a-dup"))
    hooked.ehr.seed(appointment("a-dup", status="cancelled"))  # would show if fetched again
    again = await hooked.ehr_hooks.send(changed("evt-dup", "Appointment/a-dup"))
    assert again.status == 200
    # The fetcher works in receipt order: once a later event is done, a replay recorded
    # before it would have been fetched too.
    hooked.ehr.seed(appointment("a-later"))
    await hooked.ehr_hooks.send(changed("evt-later", "Appointment/a-later"))
    await eventually(lambda: hooked.stored("Appointment/a-later"))
    assert len(hooked.ehr.requests_to("GET", "Appointment/a-dup")) == 1
    assert (await hooked.read("Appointment/a-dup"))[1]["status"] == "booked"
    assert await hooked.versions("Appointment/a-dup") == 1
    assert [r.event_id for r in await hooked.events()] == ["evt-dup", "evt-later"]


async def test_a_new_event_for_an_unchanged_resource_adds_no_version(hooked: Hooked) -> None:
    hooked.ehr.seed(patient("p-same"))
    await hooked.ehr_hooks.send(changed("evt-s1", "Patient/p-same"))
    await eventually(lambda: hooked.stored("Patient/p-same"))
    await hooked.ehr_hooks.send(changed("evt-s2", "Patient/p-same"))

    async def both_done() -> bool:
        return [r.status for r in await hooked.events()] == ["done", "done"]

    await eventually(both_done)
    assert [r.reason for r in await hooked.events()] == ["", "unchanged"]
    assert await hooked.versions("Patient/p-same") == 1


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["wrong-secret", "unsigned", "tampered", "garbage"])
async def test_forged_event_is_401_on_record_and_fetches_nothing(hooked: Hooked,
                                                                 how: str) -> None:
    hooked.ehr.seed(patient("p-forged"))
    event = changed("evt-forged", "Patient/p-forged")
    if how == "wrong-secret":
        sent = await hooked.ehr_hooks.send(event, secret=b"not-the-secret")
    elif how == "unsigned":
        sent = await hooked.ehr_hooks.send(event, sign=False)
    elif how == "tampered":  # signed for one body, another sent
        import orjson

        from support.webhooks import signature
        good = signature(EHR_SECRET, orjson.dumps(changed("evt-x", "Patient/other")))
        sent = await hooked.ehr_hooks.send(event, sign=False, headers={"X-Signature": good})
    else:
        sent = await hooked.ehr_hooks.send(event, sign=False,
                                           headers={"X-Signature": "sha256=zz"})
    assert sent.status == 401
    assert sent.body["resourceType"] == "OperationOutcome"
    assert sent.body["issue"][0]["code"] == "security"
    [record] = await notify_records(hooked.gateway)
    assert record["outcome"] == "401" and record["client"] == "webhook:ehr"
    assert "refused" in record["detail"]
    assert await hooked.events() == []
    assert hooked.ehr.requests_to("GET") == []
    assert (await hooked.read("Patient/p-forged"))[0] == 404


@pytest.mark.parametrize("offset", [-3600, 3600])
async def test_timestamp_outside_the_tolerance_is_401(hooked: Hooked, offset: int) -> None:
    event = scheduled("whk_old", "patient.updated", patient={"id": "p-old"})
    sent = await hooked.sched_hooks.send(event, timestamp=time.time() + offset)
    assert sent.status == 401
    assert "tolerance" in sent.body["issue"][0]["diagnostics"]
    assert await hooked.events() == []


async def test_timestamped_signature_covers_the_timestamp(hooked: Hooked) -> None:
    """A signature made for one timestamp does not verify under another (a replayed body
    with a fresh timestamp header)."""
    import orjson

    from support.webhooks import signature
    body = orjson.dumps(scheduled("whk_ts", "patient.updated", patient={"id": "p-ts"}))
    old = str(int(time.time()) - 10)
    sent = await hooked.sched_hooks.send(None, raw=body, sign=False, headers={
        "X-Signature": signature(SCHED_SECRET, body, old)})
    assert sent.status == 401


async def test_unknown_backend_and_backend_without_webhook_are_404(hooked: Hooked) -> None:
    for name in ("nosuch", "plain"):
        sent = await hooked.ehr_hooks.send(changed("evt-404", "Patient/p1"), backend=name)
        assert sent.status == 404
        assert sent.body["resourceType"] == "OperationOutcome"
    assert hooked.ehr.requests_to("GET") == []


MALFORMED: list[tuple[str, bytes]] = [
    ("not-json", b"{not json"),
    ("array", b"[1, 2]"),
    ("no-event-id", b'{"type": "resource.updated", "focus": {"reference": "Patient/p1"}}'),
    ("unknown-kind", b'{"id": "e", "type": "resource.exploded"}'),
    ("no-reference", b'{"id": "e", "type": "resource.updated"}'),
    ("path-escape", b'{"id": "e", "type": "resource.updated", '
                    b'"focus": {"reference": "../../admin/secrets"}}'),
    ("not-a-type", b'{"id": "e", "type": "resource.updated", '
                   b'"focus": {"reference": "Nonsense/p1"}}'),
    ("foreign-host", b'{"id": "e", "type": "resource.updated", '
                     b'"focus": {"reference": "https://evil.example/fhir/Patient/p1"}}'),
    ("numeric-reference", b'{"id": "e", "type": "resource.updated", '
                          b'"focus": {"reference": 42}}'),
]


@pytest.mark.parametrize(("case", "raw"), MALFORMED, ids=[c for c, _ in MALFORMED])
async def test_malformed_event_is_400_operation_outcome(hooked: Hooked, case: str,
                                                        raw: bytes) -> None:
    sent = await hooked.ehr_hooks.send(None, raw=raw)
    assert sent.status == 400, case
    assert sent.body["resourceType"] == "OperationOutcome"
    assert sent.body["issue"][0]["code"] == "invalid"
    assert await hooked.events() == []
    assert hooked.ehr.requests_to("GET") == []


async def test_template_placeholder_refuses_a_value_that_would_change_the_path(
        hooked: Hooked) -> None:
    sent = await hooked.sched_hooks.send(scheduled(
        "whk_bad", "appointment.created", appointment={"id": "x/../../Patient"}))
    assert sent.status == 400
    assert await hooked.events() == []


async def test_oversized_event_is_413(hooked: Hooked) -> None:
    big = changed("evt-big", "Patient/p1")
    big["padding"] = "x" * 300_000
    sent = await hooked.ehr_hooks.send(big)
    assert sent.status == 413
    assert await hooked.events() == []


async def test_oversized_chunked_event_without_a_length_is_413(hooked: Hooked) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 10_000

    async with aiohttp.ClientSession() as session, session.post(
            f"{hooked.gateway.http_url}/webhooks/ehr", data=chunks(),
            headers={"X-Signature": "sha256=" + "0" * 64}) as answer:
        assert answer.status == 413
        assert (await answer.json(content_type=None))["resourceType"] == "OperationOutcome"
    assert await hooked.events() == []


# -- failures after the 202 -------------------------------------------------------------------


async def test_backend_down_during_fetch_is_retried_later_not_lost(hooked: Hooked) -> None:
    hooked.ehr.seed(appointment("a-down"))
    hooked.ehr.fail_all(503)
    sent = await hooked.ehr_hooks.send(changed("evt-down", "Appointment/a-down"))
    assert sent.status == 202

    async def tried_twice() -> bool:
        rows = await hooked.events()
        return bool(rows) and rows[0].attempts >= 2 and rows[0].status == "pending"

    await eventually(tried_twice, timeout=20)
    assert (await hooked.read("Appointment/a-down"))[0] == 404
    hooked.ehr.fail_all(None)
    await eventually(lambda: hooked.stored("Appointment/a-down"), timeout=20)
    [row] = await hooked.events()
    assert row.status == "done"


async def test_backend_unreachable_then_back(hooked: Hooked) -> None:
    hooked.ehr.seed(patient("p-gone-away"))
    await hooked.ehr.stop()
    try:
        sent = await hooked.ehr_hooks.send(changed("evt-off", "Patient/p-gone-away"))
        assert sent.status == 202

        async def failed_once() -> bool:
            rows = await hooked.events()
            return bool(rows) and rows[0].attempts >= 1
        await eventually(failed_once, timeout=20)
    finally:
        await hooked.ehr.start()
    await eventually(lambda: hooked.stored("Patient/p-gone-away"), timeout=20)


async def test_event_accepted_before_a_restart_is_fetched_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_EHR_HOOK_SECRET", EHR_SECRET.decode())
    monkeypatch.setenv("TEST_SCHED_HOOK_SECRET", SCHED_SECRET.decode())
    site = tmp_path / "site"
    (site / "vendors").mkdir(parents=True)
    (site / "vendors" / "siteehr.csv").write_text(VENDOR_TABLE)
    async with FakeEhr() as ehr:
        ehr.seed(appointment("a-restart"))
        ehr.fail_all(503)
        config = gateway_config(ehr, site)
        first = await start_fhir_gateway(tmp_path / "var", **config)
        try:
            sender = WebhookSender(first.http_url, "ehr", EHR_SECRET)
            assert (await sender.send(changed("evt-r", "Appointment/a-restart"))).status == 202
            await eventually(lambda: bool(ehr.requests_to("GET", "Appointment/a-restart")))
        finally:
            await first.runner.cleanup()
        ehr.fail_all(None)
        second = await start_fhir_gateway(tmp_path / "var", **config)
        try:
            again = Hooked(second, ehr, sender, sender, config)
            await eventually(lambda: again.stored("Appointment/a-restart"), timeout=20)
            [row] = await again.events()
            assert row.status == "done" and row.event_id == "evt-r"
        finally:
            await second.runner.cleanup()


async def test_resource_gone_at_the_backend_is_listed_gone(hooked: Hooked) -> None:
    sent = await hooked.ehr_hooks.send(changed("evt-404", "Patient/never-there"))
    assert sent.status == 202

    async def gone() -> bool:
        return [r.status for r in await hooked.events()] == ["gone"]

    await eventually(gone)
    assert (await hooked.read("Patient/never-there"))[0] == 404


async def test_answer_of_another_type_or_invalid_r4_is_failed_not_stored(
        hooked: Hooked) -> None:
    hooked.ehr.seed({"resourceType": "Patient", "id": "p-bad", "gender": "sometimes"})
    await hooked.ehr_hooks.send(changed("evt-bad", "Patient/p-bad"))

    async def failed() -> bool:
        return [r.status for r in await hooked.events()] == ["failed"]

    await eventually(failed)
    [row] = await hooked.events()
    assert row.reason.startswith("not valid R4: Patient.gender")
    assert (await hooked.read("Patient/p-bad"))[0] == 404


# -- no PHI outside the data path -------------------------------------------------------------


async def test_no_canary_in_logs_answers_or_the_event_file(
        hooked: Hooked, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hooked.ehr.seed(patient(CANARY_ID, family=CANARY))
    answers = []
    event = changed("evt-canary", f"Patient/{CANARY_ID}")
    event["patient_name"] = CANARY
    answers.append(await hooked.ehr_hooks.send(event))
    answers.append(await hooked.ehr_hooks.send(event, secret=b"forged"))
    answers.append(await hooked.ehr_hooks.send(
        None, raw=b'{"id": "e", "type": "resource.updated", "focus": {"reference": "'
        + CANARY.encode() + b'/x"}, "n": "' + CANARY.encode() + b'"}'))
    answers.append(await hooked.sched_hooks.send(scheduled(
        "whk_c", "patient.updated", patient={"id": CANARY + "/.."})))
    answers.append(await hooked.ehr_hooks.send({"id": CANARY, "type": "resource.updated",
                                                 "focus": {"reference": 7}}))
    assert [a.status for a in answers] == [202, 401, 400, 400, 400]
    await eventually(lambda: hooked.stored(f"Patient/{CANARY_ID}"))
    hooked.ehr.fail_all(503)  # a failing fetch logs too
    await hooked.ehr_hooks.send(changed("evt-canary-2", f"Patient/{CANARY_ID}"))

    async def retried() -> bool:
        return any(r.attempts >= 1 and r.status == "pending" for r in await hooked.events())

    await eventually(retried, timeout=20)
    for answer in answers:
        assert CANARY.lower() not in answer.text.lower()
    # The test's own runner logs request lines (`isthmus serve` runs without an access
    # log, and the test itself asked /fhir for the canary id): the gateway's lines only.
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name != "aiohttp.access")
    assert "webhook event" in logged  # the failing fetch was logged, without values
    assert CANARY.lower() not in logged.lower()
    files = list(hooked.gateway.data_dir.glob("webhooks.db*"))
    assert files
    for path in files:  # the resource reference is sealed at rest
        assert CANARY_ID.encode() not in path.read_bytes()


# -- configuration ----------------------------------------------------------------------------


async def test_a_missing_secret_stops_the_start(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_EHR_HOOK_SECRET", raising=False)
    monkeypatch.setenv("TEST_SCHED_HOOK_SECRET", SCHED_SECRET.decode())
    site = tmp_path / "site"
    (site / "vendors").mkdir(parents=True)
    (site / "vendors" / "siteehr.csv").write_text(VENDOR_TABLE)
    async with FakeEhr() as ehr:
        with pytest.raises(ConfigError, match="TEST_EHR_HOOK_SECRET"):
            await start_fhir_gateway(tmp_path / "var", **gateway_config(ehr, site))


def test_only_a_fhir_backend_may_send_webhooks() -> None:
    with pytest.raises(ValueError, match="only a fhir backend"):
        BackendConfig(name="lab", kind="mllp", host="127.0.0.1", port=2575,
                      webhook=InboundWebhookConfig(secret_env="X", shape="scheduling"))


async def test_webhooks_list_shows_events_without_their_resource(
        hooked: Hooked, capsys: pytest.CaptureFixture[str]) -> None:
    hooked.ehr.seed(patient(CANARY_ID))
    await hooked.ehr_hooks.send(changed("evt-listed", f"Patient/{CANARY_ID}"))
    await eventually(lambda: hooked.stored(f"Patient/{CANARY_ID}"))
    code = await asyncio.get_running_loop().run_in_executor(None, cli_main, [
        "webhooks", "list", "--data-dir", str(hooked.gateway.data_dir), "--status", "done"])
    out = capsys.readouterr().out
    assert code == 0
    [line] = [n for n in out.splitlines() if "evt-listed" in n]
    assert "resource.updated" in line and "done" in line and "Patient" in line
    assert CANARY_ID not in out


async def test_metrics_count_events_by_backend_and_outcome(hooked: Hooked) -> None:
    hooked.ehr.seed(patient("p-metric"))
    await hooked.ehr_hooks.send(changed("evt-m1", "Patient/p-metric"))
    await hooked.ehr_hooks.send(changed("evt-m1", "Patient/p-metric"))
    await hooked.ehr_hooks.send(changed("evt-m2", "Patient/p-metric"), secret=b"forged")
    await eventually(lambda: hooked.stored("Patient/p-metric"))

    async def counted() -> str:
        async with aiohttp.ClientSession() as http, http.get(
                f"{hooked.gateway.http_url}/metrics") as answer:
            return await answer.text()

    async def done_counted() -> bool:
        return 'outcome="done"' in await counted()

    await eventually(done_counted)
    lines = [n for n in (await counted()).splitlines()
             if n.startswith("isthmus_webhook_events_total{")]
    found = {line.split('outcome="')[1].split('"')[0]: line.rsplit(" ", 1)[1]
             for line in lines}
    assert found == {"accepted": "1", "replayed": "1", "refused": "1", "done": "1"}, lines
    assert all('backend="ehr"' in line for line in lines)
