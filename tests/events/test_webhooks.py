"""`[[webhooks]]` from the config: signed simple events for MLLP and FHIR changes, none for
an MLLP resend that changes nothing; a bad webhook config is a clear one-line error."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import MllpPeer, message, segments, start_gateway, with_control_id
from gateway.app.events import EVENTS, event_purger
from gateway.app.files import FHIR_FILE
from gateway.config import ConfigError, load_settings
from support.fhir import fhir_session, start_fhir_gateway
from support.subscriber import WEBHOOK_SECRET, Subscriber
from support.wait import eventually

FAST = {"events.poll_interval": 0.02, "forward.poll_interval": 0.05}


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISTHMUS_TEST_HOOK_SECRET", WEBHOOK_SECRET)


def hook(url: str, events: list[str], payload: str = "ids", **more: Any) -> dict[str, Any]:
    return {"name": "crm", "url": url, "events": events,
            "secret_env": "ISTHMUS_TEST_HOOK_SECRET", "payload": payload, **more}


@pytest.mark.parametrize("workers", [0, 1])
async def test_mllp_admission_notifies_once_and_a_resend_changes_nothing(
        tmp_path: Path, subscriber: Subscriber, workers: int) -> None:
    # workers 1: the message is applied by an apply worker process; the edge's pump reads
    # the event it wrote to the shared store.
    gateway = await start_gateway(tmp_path / "var", webhooks=[hook(
        subscriber.url, ["patient.created", "patient.updated"], "flat")],
        **{**FAST, "processes.workers": workers})
    try:
        peer = await MllpPeer.open(gateway.mllp_port)
        raw = message("adt_a01.hl7")
        assert segments(await peer.request(raw))["MSA"][0][1] == "AA"
        await eventually(lambda: len(subscriber.accepted()) == 1, timeout=10)
        [note] = subscriber.accepted()
        assert note.signed_with(WEBHOOK_SECRET)
        assert note.json["event"] == "patient.created"
        assert note.json["data"]["id"] == note.json["resource"]["id"]
        assert note.event_id == note.json["id"]
        # The same message under a new control id: applied again, but nothing changes.
        resent = with_control_id(raw, "CTRL-ADT-RESEND")
        assert segments(await peer.request(resent))["MSA"][0][1] == "AA"
        await peer.close()

        async def applied() -> bool:
            return len(await gateway.inbox.with_status("applied")) == 2

        await eventually(applied, timeout=10)
        await gateway.app[EVENTS].drain(5)
        assert len(subscriber.notifications) == 1
    finally:
        await gateway.runner.cleanup()


async def test_fhir_write_notifies_appointment_created_with_ids(
        tmp_path: Path, subscriber: Subscriber) -> None:
    gateway = await start_fhir_gateway(tmp_path / "var", webhooks=[hook(
        subscriber.url, ["appointment.created"])], **FAST)
    try:
        body = {"resourceType": "Appointment", "status": "booked",
                "participant": [{"actor": {"reference": "Patient/p9"}, "status": "accepted"}]}
        async with fhir_session(gateway) as session:
            async with session.post("/fhir/Appointment", json=body) as resp:
                created = await resp.json()
        await eventually(lambda: len(subscriber.accepted()) == 1, timeout=10)
        [note] = subscriber.accepted()
        assert note.json["resource"] == {"type": "Appointment", "id": created["id"],
                                         "versionId": "1"}
        assert "data" not in note.json
        assert note.headers["X-Isthmus-Event-Id"] == f"Appointment/{created['id']}/_history/1"
    finally:
        await gateway.runner.cleanup()


@pytest.mark.parametrize(("change", "named"), [
    ({"payload": "xml"}, "payload"),
    ({"events": ["appointment.created", "Appointment.Moved"]}, "Appointment.Moved"),
    ({"url": "not a url"}, "url"),
    ({"url": "http://example.org/hook"}, "https"),
    ({"secret_env": "bad name!"}, "secret_env"),
])
def test_bad_webhook_config_is_refused_at_load(change: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={}, overrides={
            "webhooks": [{**hook("https://example.org/hook", ["patient.created"]),
                          **change}]})
    assert named in str(caught.value)


@pytest.mark.parametrize(("change", "named"), [
    ({"secret_env": "ISTHMUS_TEST_UNSET_SECRET"}, "ISTHMUS_TEST_UNSET_SECRET is not set"),
    ({"events": ["spaceship.created"]}, "unknown event spaceship.created"),
])
async def test_bad_webhook_config_is_a_one_line_startup_error(
        tmp_path: Path, change: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        await start_gateway(tmp_path / "var", webhooks=[
            {**hook("https://example.org/hook", ["patient.created"]), **change}])
    text = str(caught.value)
    assert named in text and "\n" not in text


async def test_handled_events_are_purged_and_later_ones_still_notify(
        tmp_path: Path, subscriber: Subscriber) -> None:
    gateway = await start_fhir_gateway(tmp_path / "var", webhooks=[hook(
        subscriber.url, ["appointment.created"])], **FAST)
    body = {"resourceType": "Appointment", "status": "booked",
            "participant": [{"actor": {"reference": "Patient/p9"}, "status": "accepted"}]}
    fhir_file = tmp_path / "var" / FHIR_FILE

    def events_kept() -> int:
        with sqlite3.connect(fhir_file) as db:
            return int(db.execute("SELECT count(*) FROM fhir_event").fetchone()[0])

    try:
        async with fhir_session(gateway) as session:
            for _ in range(2):
                async with session.post("/fhir/Appointment", json=body) as resp:
                    assert resp.status == 201
            await gateway.app[EVENTS].drain(5)
            purge = event_purger(gateway.app)
            assert await purge(datetime.now(UTC) - timedelta(days=1)) == 0  # too young
            assert await purge(datetime.now(UTC) + timedelta(seconds=1)) == 2
            assert events_kept() == 0
            async with session.post("/fhir/Appointment", json=body) as resp:
                assert resp.status == 201
        await eventually(lambda: len(subscriber.accepted()) == 3, timeout=10)
        assert events_kept() == 1
    finally:
        await gateway.runner.cleanup()
