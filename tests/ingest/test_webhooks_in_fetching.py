"""What the webhook fetcher does with its answers, over real HTTP (two fake EHRs on
127.0.0.1 posting to a running gateway): each backend's events are fetched apart, so one
that hangs holds up none of another's; a resource the backend deleted (410, or 404 for a
deletion event) is deleted from the local store as any delete is, while a bare 404 keeps
the local copy. All data is synthetic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import RunningGateway
from gateway.app.state import FHIR_STORE
from gateway.edge.webhooks_http import WEBHOOKS
from gateway.store.fhir import WriteRequest
from support.fake_ehr import FakeEhr
from support.fhir import fhir_session, start_fhir_gateway
from support.wait import eventually
from support.webhooks import WebhookSender

EHR_SECRET = b"synthetic-fetching-secret-12"
SLOW_SECRET = b"synthetic-slow-backend-secret-34"


def appointment(id: str, status: str = "booked") -> dict[str, Any]:
    return {"resourceType": "Appointment", "id": id, "status": status,
            "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}]}


def changed(event_id: str, reference: str, kind: str = "resource.updated") -> dict[str, Any]:
    return {"id": event_id, "type": kind, "focus": {"reference": reference}}


@dataclass
class Two:
    gateway: RunningGateway
    ehr: FakeEhr
    slow: FakeEhr
    ehr_hooks: WebhookSender
    slow_hooks: WebhookSender

    async def read(self, path: str) -> int:
        async with fhir_session(self.gateway) as http, http.get(f"/fhir/{path}") as answer:
            return answer.status

    async def stored(self, path: str) -> bool:
        return await self.read(path) == 200

    async def history(self, path: str) -> list[dict[str, Any]]:
        async with fhir_session(self.gateway) as http, http.get(
                f"/fhir/{path}/_history") as answer:
            return list((await answer.json(content_type=None)).get("entry", []))

    async def event(self, backend: str, event_id: str) -> tuple[str, int, str] | None:
        for row in await self.gateway.app[WEBHOOKS].events.rows():
            if row.backend == backend and row.event_id == event_id:
                return row.status, row.attempts, row.reason
        return None

    async def delete_at_ehr(self, path: str) -> None:
        async with aiohttp.ClientSession() as http, http.delete(
                f"{self.ehr.url}/{path}") as answer:
            assert answer.status in (200, 204)


@pytest.fixture
async def two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Two]:
    monkeypatch.setenv("TEST_FETCH_EHR_SECRET", EHR_SECRET.decode())
    monkeypatch.setenv("TEST_FETCH_SLOW_SECRET", SLOW_SECRET.decode())
    async with FakeEhr() as ehr, FakeEhr() as slow:
        backends = [
            {"name": "ehr", "kind": "fhir", "base_url": ehr.url, "max_retries": 0,
             "webhook": {"secret_env": "TEST_FETCH_EHR_SECRET", "shape": "ehr-changed",
                         "retry_max_delay": 0.3}},
            # Answers only after far longer than any wait here: a backend that hangs.
            {"name": "slow", "kind": "fhir", "base_url": slow.url, "max_retries": 0,
             "read_timeout": 600,
             "webhook": {"secret_env": "TEST_FETCH_SLOW_SECRET", "shape": "ehr-changed"}},
        ]
        running = await start_fhir_gateway(tmp_path / "var", backends=backends)
        try:
            yield Two(running, ehr, slow, WebhookSender(running.http_url, "ehr", EHR_SECRET),
                      WebhookSender(running.http_url, "slow", SLOW_SECRET))
        finally:
            await running.runner.cleanup()


# -- one backend's outage is its own ---------------------------------------------------------


async def test_a_hanging_backend_does_not_hold_up_another_backends_events(two: Two) -> None:
    two.slow.seed(appointment("a-slow"))
    two.slow.delay = 600.0
    assert (await two.slow_hooks.send(changed("evt-slow", "Appointment/a-slow"))).status == 202
    # The slow backend's fetch is in flight (received, not answered) ...
    await eventually(lambda: bool(two.slow.requests_to("GET", "Appointment/a-slow")))
    two.ehr.seed(appointment("a-fast"))
    assert (await two.ehr_hooks.send(changed("evt-fast", "Appointment/a-fast"))).status == 202

    async def fast_done() -> bool:
        return await two.event("ehr", "evt-fast") == ("done", 1, "")

    # ... and the other backend's event, received after it, is fetched and stored.
    await eventually(fast_done)
    assert await two.read("Appointment/a-fast") == 200
    # The slow one is still in its first fetch: nothing finished or retried it.
    assert await two.event("slow", "evt-slow") == ("pending", 0, "")
    assert await two.read("Appointment/a-slow") == 404


async def test_a_backend_that_is_down_does_not_hold_up_another_backends_events(
        two: Two) -> None:
    await two.slow.stop()
    await two.slow_hooks.send(changed("evt-down", "Appointment/a-down"))
    two.ehr.seed(appointment("a-up"))
    await two.ehr_hooks.send(changed("evt-up", "Appointment/a-up"))
    await eventually(lambda: two.stored("Appointment/a-up"))

    async def retried() -> bool:
        found = await two.event("slow", "evt-down")
        return found is not None and found[0] == "pending" and found[1] >= 1

    await eventually(retried)


async def test_a_resource_deleted_and_created_again_at_the_backend_follows_locally(
        two: Two) -> None:
    """Stored, deleted, stored again: the local history has the same three steps."""
    two.ehr.seed(appointment("a-seq"))
    await two.ehr_hooks.send(changed("evt-s1", "Appointment/a-seq", "resource.created"))
    await eventually(lambda: two.stored("Appointment/a-seq"))
    await two.delete_at_ehr("Appointment/a-seq")
    await two.ehr_hooks.send(changed("evt-s2", "Appointment/a-seq", "resource.deleted"))

    async def deleted() -> bool:
        return await two.read("Appointment/a-seq") == 410

    await eventually(deleted)
    two.ehr.seed(appointment("a-seq", status="cancelled"))
    await two.ehr_hooks.send(changed("evt-s3", "Appointment/a-seq", "resource.created"))

    async def back() -> bool:
        return await two.read("Appointment/a-seq") == 200

    await eventually(back)
    entries = await two.history("Appointment/a-seq")
    methods = [e["request"]["method"] for e in reversed(entries)]
    assert methods == ["POST", "DELETE", "PUT"]


# -- deletions are mirrored ------------------------------------------------------------------


async def test_410_from_the_backend_deletes_the_local_copy(two: Two) -> None:
    two.ehr.seed(appointment("a-del"))
    await two.ehr_hooks.send(changed("evt-d1", "Appointment/a-del"))
    await eventually(lambda: two.stored("Appointment/a-del"))
    assert await two.read("Appointment/a-del") == 200
    await two.delete_at_ehr("Appointment/a-del")
    # An update event: the fetch answers 410, which is enough.
    await two.ehr_hooks.send(changed("evt-d2", "Appointment/a-del"))

    async def gone() -> bool:
        return await two.event("ehr", "evt-d2") == ("gone", 1, "HTTP 410; deleted locally")

    await eventually(gone)
    assert await two.read("Appointment/a-del") == 410  # a delete like any other
    entries = await two.history("Appointment/a-del")
    assert [e["request"]["method"] for e in entries] == ["DELETE", "POST"]
    async with fhir_session(two.gateway) as http, http.get(
            "/fhir/Appointment", params={"_id": "a-del"}) as answer:
        assert answer.status == 200
        assert (await answer.json(content_type=None)).get("entry", []) == []


async def local_copy(two: Two, id: str) -> None:
    """A local copy that came another way than this backend's webhook."""
    await two.gateway.app[FHIR_STORE].transact([WriteRequest(
        "PUT", "Appointment", id=id, resource=appointment(id))])
    assert await two.read(f"Appointment/{id}") == 200


async def test_a_deletion_event_answered_404_deletes_the_local_copy(two: Two) -> None:
    await local_copy(two, "a-404del")
    await two.ehr_hooks.send(changed("evt-4d", "Appointment/a-404del", "resource.deleted"))

    async def gone() -> bool:
        return await two.event("ehr", "evt-4d") == ("gone", 1, "HTTP 404; deleted locally")

    await eventually(gone)
    assert await two.read("Appointment/a-404del") == 410


async def test_a_bare_404_keeps_the_local_copy(two: Two) -> None:
    """An update event for a resource the backend never had: nothing says it was deleted
    (the local copy may be another source's), so it stays."""
    await local_copy(two, "a-404kept")
    await two.ehr_hooks.send(changed("evt-4k", "Appointment/a-404kept"))

    async def gone() -> bool:
        return await two.event("ehr", "evt-4k") == ("gone", 1, "HTTP 404; local copy kept")

    await eventually(gone)
    assert await two.read("Appointment/a-404kept") == 200
    assert len(await two.history("Appointment/a-404kept")) == 1


async def test_a_deletion_event_for_a_resource_the_backend_still_has_stores_it(
        two: Two) -> None:
    """The fetch decides, not the event's kind: a deletion the backend does not confirm
    (undone, or out of order) leaves the backend's current version locally."""
    two.ehr.seed(appointment("a-still"))
    await two.ehr_hooks.send(changed("evt-st", "Appointment/a-still", "resource.deleted"))

    async def done() -> bool:
        return await two.event("ehr", "evt-st") == ("done", 1, "")

    await eventually(done)
    assert await two.read("Appointment/a-still") == 200


async def test_a_deletion_of_what_was_never_stored_is_gone_with_nothing_deleted(
        two: Two) -> None:
    await two.ehr_hooks.send(changed("evt-nv", "Appointment/a-never", "resource.deleted"))

    async def gone() -> bool:
        return await two.event("ehr", "evt-nv") == ("gone", 1, "HTTP 404; no local copy")

    await eventually(gone)
    assert await two.read("Appointment/a-never") == 404


async def test_events_of_a_backend_that_left_the_config_fail_at_the_next_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_FETCH_EHR_SECRET", EHR_SECRET.decode())
    monkeypatch.setenv("TEST_FETCH_SLOW_SECRET", SLOW_SECRET.decode())
    async with FakeEhr() as ehr:
        ehr.fail_all(503)  # nothing is fetched before the restart
        kept = {"name": "ehr", "kind": "fhir", "base_url": ehr.url, "max_retries": 0,
                "webhook": {"secret_env": "TEST_FETCH_EHR_SECRET", "shape": "ehr-changed"}}
        left = {**kept, "name": "old",
                "webhook": {"secret_env": "TEST_FETCH_SLOW_SECRET", "shape": "ehr-changed"}}
        running = await start_fhir_gateway(tmp_path / "var", backends=[kept, left])
        try:
            for sender, event_id in ((WebhookSender(running.http_url, "ehr", EHR_SECRET),
                                      "evt-k"),
                                     (WebhookSender(running.http_url, "old", SLOW_SECRET),
                                      "evt-o")):
                assert (await sender.send(changed(event_id, "Appointment/a-o"))).status == 202
        finally:
            await running.runner.cleanup()
        running = await start_fhir_gateway(tmp_path / "var", backends=[kept])
        try:
            async def statuses() -> dict[str, tuple[str, str]]:
                return {r.backend: (r.status, r.reason)
                        for r in await running.app[WEBHOOKS].events.rows()}

            async def abandoned() -> bool:
                return (await statuses())["old"] == ("failed", "backend not configured")

            await eventually(abandoned)
            assert (await statuses())["ehr"][0] == "pending"  # its backend still fails
        finally:
            await running.runner.cleanup()
