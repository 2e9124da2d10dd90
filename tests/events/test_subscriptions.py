"""FHIR Subscriptions end to end: a real gateway, a real subscriber on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from conftest import RunningGateway
from gateway.app.events import EVENTS
from support.cli import isthmus
from support.fhir import api_key_config, fhir_session, is_outcome, start_fhir_gateway
from support.subscriber import SECRET, Subscriber
from support.wait import eventually

READER_KEY = "synthetic-reader-key-41c2"
FAST = {"events.client_secret_env": {"fhir-tests": "ISTHMUS_TEST_SUB_SECRET",
                                     "vitals-only": "ISTHMUS_TEST_SUB_SECRET"},
        "events.retry_base": 0.02, "events.retry_max_delay": 0.05,
        "events.poll_interval": 0.02, "forward.poll_interval": 0.05,
        "events.outbox_poll_interval": 0.05}


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISTHMUS_TEST_SUB_SECRET", SECRET)


async def _gateway(tmp_path: Path, **overrides: Any) -> RunningGateway:
    reader = api_key_config("vitals-only", READER_KEY, [
        "system/Observation.rs?category=vital-signs", "system/Subscription.cruds"])
    return await start_fhir_gateway(tmp_path / "var", extra_keys=[reader],
                                    **{**FAST, **overrides})


def subscription(url: str, criteria: str = "Observation?status=final",
                 payload: str | None = "application/fhir+json") -> dict[str, Any]:
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": url,
                               "header": ["X-Tenant: synthetic-7"]}
    if payload is not None:
        channel["payload"] = payload
    return {"resourceType": "Subscription", "status": "requested", "reason": "tests",
            "criteria": criteria, "channel": channel}


def observation(category: str, text: str, value: int = 1) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": category}]}],
            "code": {"text": text}, "subject": {"reference": "Patient/p1"},
            "valueQuantity": {"value": value, "unit": "mmHg"}}


async def _subscribe(gateway: RunningGateway, body: dict[str, Any],
                     key: str | None = None) -> str:
    async with fhir_session(gateway, **({"key": key} if key else {})) as session:
        async with session.post("/fhir/Subscription", json=body) as resp:
            assert resp.status == 201, await resp.text()
            created = await resp.json()
        assert created["status"] == "requested"
        id_ = str(created["id"])

        async def active() -> bool:
            async with session.get(f"/fhir/Subscription/{id_}") as got:
                return bool((await got.json())["status"] == "active")

        await eventually(active, timeout=10, what="the Subscription to become active")
    return id_


async def _post(gateway: RunningGateway, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with fhir_session(gateway) as session:
        async with session.post(path, json=body) as resp:
            assert resp.status == 201, await resp.text()
            return dict(await resp.json())


async def test_handshake_then_signed_fhir_payload_and_no_event_for_a_noop_resend(
        tmp_path: Path, subscriber: Subscriber) -> None:
    gateway = await _gateway(tmp_path)
    try:
        sub_id = await _subscribe(gateway, subscription(subscriber.url))
        [shake] = subscriber.handshakes
        assert shake.signed_with(SECRET)
        assert shake.json["subscription"] == f"Subscription/{sub_id}"
        created = await _post(gateway, "/fhir/Observation", observation("laboratory", "K"))
        await eventually(lambda: len(subscriber.notifications) == 1, timeout=10)
        note = subscriber.notifications[0]
        assert note.signed_with(SECRET)
        assert not note.signed_with("another-secret")
        assert note.headers["X-Tenant"] == "synthetic-7"
        assert note.headers["Content-Type"].startswith("application/fhir+json")
        assert note.event_id == f"Observation/{created['id']}/_history/1"
        bundle = Bundle.model_validate(note.json)
        assert bundle.type == "history"
        assert note.json["entry"][0]["resource"]["id"] == created["id"]
        # The same content again: no new version, so no event and no notification.
        async with fhir_session(gateway) as session:
            async with session.put(f"/fhir/Observation/{created['id']}", json=created) as r:
                assert r.status == 200
                assert (await r.json())["meta"]["versionId"] == "1"
            changed = {**created, "valueQuantity": {"value": 2, "unit": "mmHg"}}
            async with session.put(f"/fhir/Observation/{created['id']}", json=changed) as r:
                assert r.status == 200
        await eventually(lambda: len(subscriber.notifications) == 2, timeout=10)
        assert [n.event_id.rsplit("/", 1)[1] for n in subscriber.notifications] == ["1", "2"]
    finally:
        await gateway.runner.cleanup()


async def test_ids_only_payload_and_order_per_patient_through_500s(
        tmp_path: Path, subscriber: Subscriber) -> None:
    gateway = await _gateway(tmp_path)
    try:
        await _subscribe(gateway, subscription(subscriber.url, payload=None))
        subscriber.script = [500, 503]  # the first two attempts fail: retried, in order
        first = await _post(gateway, "/fhir/Observation", observation("laboratory", "Na", 1))
        async with fhir_session(gateway) as session:
            for value in (2, 3, 4):
                body = {**first, "valueQuantity": {"value": value, "unit": "mmHg"}}
                async with session.put(f"/fhir/Observation/{first['id']}", json=body) as r:
                    assert r.status == 200
        await eventually(lambda: len(subscriber.accepted()) == 4, timeout=15)
        versions = [n.json["resource"]["versionId"] for n in subscriber.accepted()]
        assert versions == ["1", "2", "3", "4"]
        retried = [n.event_id for n in subscriber.notifications[:3]]
        assert retried == [retried[0]] * 3  # the same event id on every attempt
        assert subscriber.accepted()[0].json["event"] == "observation.created"
        assert "entry" not in subscriber.accepted()[0].json  # ids only
    finally:
        await gateway.runner.cleanup()


async def test_dead_letter_after_a_long_outage_then_outbox_retry_redelivers(
        tmp_path: Path, subscriber: Subscriber) -> None:
    gateway = await _gateway(tmp_path, **{"events.max_attempts": 2})
    try:
        await _subscribe(gateway, subscription(subscriber.url))
        subscriber.status = 503
        await _post(gateway, "/fhir/Observation", observation("laboratory", "Cl"))
        data_dir = str(gateway.data_dir)

        async def dead() -> bool:
            code, out, _ = await isthmus("outbox", "--data-dir", data_dir, "list",
                                         "--status", "dead")
            return code == 0 and "subscription" in out and " event " in out

        await eventually(dead, timeout=15, what="the delivery to be dead-lettered")
        assert not subscriber.accepted()
        subscriber.status = 200
        code, out, err = await isthmus("outbox", "--data-dir", data_dir, "retry",
                                       "--all-dead")
        assert code == 0, err
        await eventually(lambda: len(subscriber.accepted()) == 1, timeout=15)
        assert subscriber.accepted()[0].signed_with(SECRET)
    finally:
        await gateway.runner.cleanup()


async def test_a_subscriber_gets_nothing_its_scopes_do_not_cover(
        tmp_path: Path, subscriber: Subscriber) -> None:
    canary = "CANARY-Zq81-lab-result"
    gateway = await _gateway(tmp_path)
    try:
        await _subscribe(gateway, subscription(subscriber.url, "Observation?status=final"),
                         key=READER_KEY)
        await _post(gateway, "/fhir/Observation", observation("laboratory", canary))
        vital = await _post(gateway, "/fhir/Observation", observation("vital-signs", "BP"))
        await eventually(lambda: len(subscriber.accepted()) == 1, timeout=10)
        await gateway.app[EVENTS].drain(5)
        [note] = subscriber.notifications
        assert note.json["entry"][0]["resource"]["id"] == vital["id"]
        assert all(canary.encode() not in r.body for r in subscriber.received)
    finally:
        await gateway.runner.cleanup()


@pytest.mark.parametrize(("change", "element"), [
    ({"criteria": "Observation?nonsense-param=1"}, "Subscription.criteria"),
    ({"criteria": "NotAType?x=1"}, "Subscription.criteria"),
    ({"criteria": "Observation?date=2026"}, "Subscription.criteria"),
    ({"channel": {"type": "rest-hook", "endpoint": "ftp://example.org/x"}},
     "Subscription.channel.endpoint"),
    ({"channel": {"type": "rest-hook", "endpoint": "http://example.org/x"}},
     "Subscription.channel.endpoint"),
    ({"channel": {"type": "rest-hook", "endpoint": "https://example.org/x",
                  "payload": "text/csv"}}, "Subscription.channel.payload"),
    ({"channel": {"type": "websocket"}}, "Subscription.channel.type"),
])
async def test_bad_subscriptions_get_an_operation_outcome(
        tmp_path: Path, change: dict[str, Any], element: str) -> None:
    gateway = await _gateway(tmp_path)
    try:
        body = {**subscription("https://example.org/hook"), **change}
        async with fhir_session(gateway) as session:
            async with session.post("/fhir/Subscription", json=body) as resp:
                answer = await resp.json()
                assert resp.status == 400, answer
        assert answer["resourceType"] == "OperationOutcome"
        assert answer["issue"][0]["expression"] == [element]
    finally:
        await gateway.runner.cleanup()


async def test_subscription_on_a_type_the_client_may_not_read_is_refused(
        tmp_path: Path) -> None:
    gateway = await _gateway(tmp_path)
    try:
        body = subscription("https://example.org/hook", "Patient?name=x")
        async with fhir_session(gateway, key=READER_KEY) as session:
            async with session.post("/fhir/Subscription", json=body) as resp:
                from support.fhir import Answer
                answer = Answer(resp.status, await resp.json(), b"", resp.headers)
        assert is_outcome(answer, 403)
    finally:
        await gateway.runner.cleanup()


async def test_a_refused_handshake_puts_the_subscription_in_error_with_the_reason(
        tmp_path: Path, subscriber: Subscriber) -> None:
    subscriber.status = 500
    gateway = await _gateway(tmp_path, **{"events.handshake_attempts": 2})
    try:
        async with fhir_session(gateway) as session:
            async with session.post("/fhir/Subscription",
                                    json=subscription(subscriber.url)) as resp:
                id_ = (await resp.json())["id"]

            async def errored() -> dict[str, Any] | None:
                async with session.get(f"/fhir/Subscription/{id_}") as got:
                    body = await got.json()
                return body if body["status"] == "error" else None

            await eventually(errored, timeout=15, what="the Subscription in error")
            found = await errored()
        assert found is not None and "HTTP 500" in found["error"]
        assert len(subscriber.handshakes) == 2
        await _post(gateway, "/fhir/Observation", observation("laboratory", "Mg"))
        await gateway.app[EVENTS].drain(5)
        assert subscriber.notifications == []  # never active: nothing sent
    finally:
        await gateway.runner.cleanup()


async def test_deliveries_failing_again_and_again_put_the_subscription_in_error(
        tmp_path: Path, subscriber: Subscriber) -> None:
    gateway = await _gateway(tmp_path, **{"events.error_after": 3})
    try:
        id_ = await _subscribe(gateway, subscription(subscriber.url))
        subscriber.status = 503
        await _post(gateway, "/fhir/Observation", observation("laboratory", "Ca"))
        async with fhir_session(gateway) as session:
            async def errored() -> bool:
                async with session.get(f"/fhir/Subscription/{id_}") as got:
                    body = await got.json()
                return bool(body["status"] == "error" and "HTTP 503" in body["error"])

            await eventually(errored, timeout=15, what="the Subscription in error")
        tried = len(subscriber.notifications)
        assert tried >= 3
        await _post(gateway, "/fhir/Observation", observation("laboratory", "P"))
        await gateway.app[EVENTS].drain(5)
        assert len(subscriber.notifications) <= tried + 1  # in error: nothing more queued
    finally:
        await gateway.runner.cleanup()


async def test_a_subscription_in_a_bundle_is_owned_by_its_caller_and_notifies(
        tmp_path: Path, subscriber: Subscriber) -> None:
    gateway = await _gateway(tmp_path)
    try:
        good = subscription(subscriber.url)
        bad = subscription("http://insecure.example/hook")
        async with fhir_session(gateway) as session:
            # A transaction with a Subscription the gateway cannot act on: refused whole.
            refused = {"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": good, "request": {"method": "POST", "url": "Subscription"}},
                {"resource": bad, "request": {"method": "POST", "url": "Subscription"}}]}
            async with session.post("/fhir", json=refused) as resp:
                assert resp.status == 400
                outcome = await resp.json()
                assert outcome["resourceType"] == "OperationOutcome"
                assert "Bundle.entry[1]" in outcome["issue"][0]["diagnostics"]
            async with session.get("/fhir/Subscription") as resp:
                assert (await resp.json()).get("total", 0) == 0
            accepted = {"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": good, "request": {"method": "POST", "url": "Subscription"}}]}
            async with session.post("/fhir", json=accepted) as resp:
                assert resp.status == 200, await resp.text()
                location = (await resp.json())["entry"][0]["response"]["location"]
            sub_id = location.split("/")[-3]

            async def active() -> bool:
                async with session.get(f"/fhir/Subscription/{sub_id}") as got:
                    stored = await got.json()
                    return bool(stored["status"] == "active")

            await eventually(active, timeout=10, what="the Subscription to become active")
            async with session.get(f"/fhir/Subscription/{sub_id}") as got:
                stored = await got.json()
            owners = [e for e in stored.get("extension", [])
                      if e.get("url") == "urn:isthmus:subscription-owner"]
            assert len(owners) == 1  # the Bundle's caller
        created = await _post(gateway, "/fhir/Observation", observation("laboratory", "Ca"))
        await eventually(lambda: len(subscriber.notifications) == 1, timeout=10)
        assert subscriber.notifications[0].event_id == \
            f"Observation/{created['id']}/_history/1"
    finally:
        await gateway.runner.cleanup()


async def test_a_batch_refuses_only_the_subscription_it_cannot_act_on(
        tmp_path: Path, subscriber: Subscriber) -> None:
    gateway = await _gateway(tmp_path)
    try:
        batch = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": subscription("http://insecure.example/hook"),
             "request": {"method": "POST", "url": "Subscription"}},
            {"resource": subscription(subscriber.url),
             "request": {"method": "POST", "url": "Subscription"}}]}
        async with fhir_session(gateway) as session:
            async with session.post("/fhir", json=batch) as resp:
                assert resp.status == 200, await resp.text()
                answered = (await resp.json())["entry"]
            assert answered[0]["response"]["status"].startswith("400")
            assert answered[0]["response"]["outcome"]["resourceType"] == "OperationOutcome"
            assert answered[1]["response"]["status"].startswith("201")
            sub_id = answered[1]["response"]["location"].split("/")[-3]
            async with session.get(f"/fhir/Subscription/{sub_id}") as got:
                stored = await got.json()
        assert stored["status"] in ("requested", "active")  # set by the gateway
        assert any(e.get("url") == "urn:isthmus:subscription-owner"
                   for e in stored.get("extension", []))
    finally:
        await gateway.runner.cleanup()
