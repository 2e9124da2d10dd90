"""The durable outbox: the store's statuses, and the dispatcher delivering exactly once,
in per-patient order, backing off, dead-lettering, surviving a restart.

A real inbox file in tmp_path, a fake downstream MLLP system on a real 127.0.0.1 socket;
the FHIR-kind cases use a small recording backend written here (the protocol, not a
mock of our code).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from conftest import message, with_control_id
from gateway.forward.backend import Backend, Delivered, Delivery, Permanent, Retry, Verdict
from gateway.forward.mllp_backend import MllpBackend, MllpBackendSpec
from gateway.forward.outbox import DeliveryPolicy, Dispatcher, control_id_for
from gateway.store.inbox import InboundMessage
from gateway.store.inbox_sqlite import SqliteInbox
from gateway.store.outbox import OutboxEntry, SqliteOutbox, open_outbox
from gateway.telemetry import configure
from support.fake_mllp import FakeMllp
from support.wait import eventually

ADT = message("adt_a01.hl7")
_numbers = itertools.count(1)


def inbound(routes: Sequence[str], patient: str = "", bundle: bytes | None = None,
            raw: bytes = ADT) -> InboundMessage:
    control_id = f"C{next(_numbers)}"
    return InboundMessage(
        sending_application="SYNTHLAB", sending_facility="SYNTHHOSP", control_id=control_id,
        message_type="ADT^A01", version="2.5.1", peer="127.0.0.1",
        raw=with_control_id(raw, control_id), ack=b"ACK", received_at=datetime.now(UTC),
        status="routed", routes=tuple(routes), patient_key=patient, bundle=bundle)


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[SqliteInbox]:
    opened = await SqliteInbox.open(tmp_path / "inbox.db", synchronous="normal")
    yield opened
    await opened.close()


async def accept_all(inbox: SqliteInbox, messages: Sequence[InboundMessage]) -> list[int]:
    stored = await asyncio.gather(*(inbox.submit(m) for m in messages))
    return [s.inbox_id for s in stored]


async def rows(inbox: SqliteInbox) -> dict[int, tuple[int, str, str, int, float, str, str]]:
    """outbox id -> (inbox id, patient key, status, attempts, next_at, last_status, error)"""
    found = await inbox.connection.execute_fetchall(
        "SELECT id, inbox_id, patient_key, status, attempts, next_at, last_status, error "
        "FROM outbox ORDER BY id")
    return {int(r[0]): (int(r[1]), str(r[2]), str(r[3]), int(r[4]), float(r[5]), str(r[6]),
                        str(r[7])) for r in found}


def mllp(fake: FakeMllp, name: str = "down", **spec: object) -> MllpBackend:
    values: dict[str, Any] = {"ack_timeout": 1.0, "connect_timeout": 0.5,
                                 "breaker_failures": 100, **spec}
    return MllpBackend(MllpBackendSpec(name, "127.0.0.1", fake.port, **values),
                       configure("none"))


FAST = DeliveryPolicy(max_attempts=100, retry_base=0.01, retry_max_delay=0.05)


@dataclass
class Recorder:
    """A FHIR-kind backend that records what it is given and answers from a list."""

    name: str = "ehr"
    kind: str = "fhir"
    answers: list[Verdict | Exception] = field(default_factory=list)
    got: list[Delivery] = field(default_factory=list)

    async def deliver(self, delivery: Delivery) -> Verdict:
        self.got.append(delivery)
        answer = self.answers.pop(0) if self.answers else Delivered("HTTP 200")
        if isinstance(answer, Exception):
            raise answer
        return answer

    def available_in(self) -> float:
        return 0.0

    async def close(self) -> None:
        return None


def dispatcher(inbox: SqliteInbox, backends: Sequence[Backend],
               policy: DeliveryPolicy = FAST, poll: float = 0.05) -> Dispatcher:
    return Dispatcher(SqliteOutbox(inbox.connection), {b.name: b for b in backends},
                      {b.name: policy for b in backends}, configure("none"),
                      poll_interval=poll, close_grace=0.2)


# -- the store ---------------------------------------------------------------------------


async def test_store_reads_due_rows_with_payloads_and_moves_statuses(
        inbox: SqliteInbox) -> None:
    outbox = SqliteOutbox(inbox.connection)
    ids = await accept_all(inbox, [inbound(["legacy", "ehr"], "p1", bundle=b'{"b": 1}'),
                                   inbound(["legacy"], "p2"), inbound([], "p3")])
    assert await outbox.pending_counts() == {"legacy": 2, "ehr": 1}
    legacy = await outbox.due("legacy", "mllp", 0, 10)
    assert [r.inbox_id for r in legacy] == ids[:2]
    assert legacy[0].payload is not None and legacy[0].payload.startswith(b"MSH|")
    assert [r.patient_key for r in legacy] == ["p1", "p2"]
    (ehr,) = await outbox.due("ehr", "fhir", 0, 10)
    assert ehr.payload == b'{"b": 1}'
    assert await outbox.due("legacy", "mllp", legacy[0].id, 10) == legacy[1:]
    created = await outbox.oldest_pending("legacy")
    assert created is not None and abs(created - time.time()) < 5

    await outbox.mark_delivered([(legacy[0].id, "ACK AA")])
    await outbox.reschedule(legacy[1].id, 1, time.time() + 60, "ACK AR", "ACK AR")
    await outbox.dead(ehr.id, 1, "HTTP 422", "HTTP 422")
    entries = {e.id: e for e in await outbox.list_entries()}
    assert entries[legacy[0].id].status == "delivered"
    assert entries[legacy[0].id].last_status == "ACK AA"
    assert (entries[legacy[1].id].status, entries[legacy[1].id].attempts) == ("pending", 1)
    assert entries[ehr.id].status == "dead"
    assert entries[ehr.id].control_id == "C" + str(int(entries[ehr.id].control_id[1:]))
    assert entries[ehr.id].message_type == "ADT^A01"
    assert await outbox.count_pending("legacy") == 1
    assert await outbox.count_pending("legacy", legacy[0].id) == 0

    # A result for a row that is no longer pending changes nothing.
    await outbox.mark_delivered([(ehr.id, "ACK AA")])
    assert (await outbox.get(ehr.id)) == entries[ehr.id]

    assert await outbox.retry(None) == 1
    assert (await outbox.get(ehr.id)) is not None
    retried = await outbox.get(ehr.id)
    assert retried is not None and (retried.status, retried.attempts, retried.next_at) == (
        "pending", 0, 0.0)
    assert await outbox.drop([ehr.id, legacy[0].id]) == 1  # a delivered row stays so
    assert [e.id for e in await outbox.list_entries(status="dropped")] == [ehr.id]
    assert await outbox.retry([ehr.id], backend="legacy") == 0
    assert await outbox.retry([ehr.id], backend="ehr") == 1
    assert await outbox.list_entries(backend="ehr", status="dropped") == []
    assert await outbox.get(999) is None

    assert await outbox.purge_delivered(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await outbox.purge_delivered(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert await outbox.get(legacy[0].id) is None


async def test_mark_delivered_takes_thousands_of_rows_in_few_statements(
        inbox: SqliteInbox) -> None:
    outbox = SqliteOutbox(inbox.connection)
    await accept_all(inbox, [inbound(["legacy"], f"p{n % 7}") for n in range(9000)])
    due = await outbox.due("legacy", "mllp", 0, 10_000)
    assert len(due) == 9000
    await outbox.mark_delivered([(r.id, "ACK AA") for r in due])
    assert await outbox.pending_counts() == {}


async def test_open_outbox_beside_the_gateway_sees_its_rows(inbox: SqliteInbox,
                                                            tmp_path: Path) -> None:
    (inbox_id,) = await accept_all(inbox, [inbound(["legacy"], "p1")])
    async with open_outbox(tmp_path / "inbox.db") as cli:
        (entry,) = await cli.list_entries()
        assert isinstance(entry, OutboxEntry) and entry.inbox_id == inbox_id
        assert await cli.drop([entry.id]) == 1
    assert await SqliteOutbox(inbox.connection).pending_counts() == {}


# -- the dispatcher: MLLP ----------------------------------------------------------------


async def test_after_an_outage_everything_arrives_exactly_once_in_patient_order(
        inbox: SqliteInbox) -> None:
    fake = FakeMllp()
    await fake.start()
    await fake.stop()  # the port is known; the system is down
    backend = mllp(fake, breaker_failures=5, breaker_reset=0.2)
    gate = dispatcher(inbox, [backend], DeliveryPolicy(
        max_attempts=1000, retry_base=0.01, retry_max_delay=0.2, concurrency=16))
    await gate.start()
    try:
        patients = [f"patient-{n:02d}" for n in range(50)]
        messages = [inbound(["down"], patients[(n * 7) % 50]) for n in range(2000)]
        for start in range(0, 2000, 250):
            await accept_all(inbox, messages[start:start + 250])
            gate.queued(("down",) * 250)
        await asyncio.sleep(0.3)  # an outage of a while: the breaker must keep it quiet
        assert gate.pending("down") == 2000
        before = await rows(inbox)
        assert all(status == "pending" for _, _, status, *_ in before.values())
        tried = sum(attempts for _, _, _, attempts, *_ in before.values())
        assert 1 <= tried <= 10  # the breaker stops the hammering
        await fake.start()
        await gate.drain(30)
    finally:
        await gate.close()
        await backend.close()
        await fake.stop()
    after = await rows(inbox)
    by_control_id = {control_id_for(i): row for i, row in after.items()}
    assert sorted(fake.control_ids) == sorted(by_control_id)  # each exactly once
    assert all(status == "delivered" for _, _, status, *_ in after.values())
    assert gate.pending("down") == 0
    arrived: dict[str, list[int]] = {}
    for control_id in fake.control_ids:
        inbox_id, patient, *_ = by_control_id[control_id]
        arrived.setdefault(patient, []).append(inbox_id)
    assert len(arrived) == 50
    assert all(ids == sorted(ids) for ids in arrived.values())


async def test_a_retry_holds_back_the_patients_later_messages(inbox: SqliteInbox) -> None:
    async with FakeMllp() as fake:
        ids = await accept_all(inbox, [inbound(["down"], p) for p in "PPPQQ"])
        fake.script("AR")  # the first message is refused once
        backend = mllp(fake)
        gate = dispatcher(inbox, [backend])
        await gate.start()
        try:
            await eventually(lambda: _all_status(inbox, "delivered"))
        finally:
            await gate.close()
            await backend.close()
    outbox_ids = {inbox_id: i for i, (inbox_id, *_) in (await rows(inbox)).items()}
    p = [control_id_for(outbox_ids[i]) for i in ids[:3]]
    assert [c for c in fake.control_ids if c in p][:2] == [p[0], p[0]]
    assert [c for c in fake.control_ids if c in p] == [p[0], p[0], p[1], p[2]]


async def _all_status(inbox: SqliteInbox, status: str) -> bool:
    return all(row[2] == status for row in (await rows(inbox)).values())


async def test_retries_back_off_then_dead_letter_after_max_attempts(
        inbox: SqliteInbox) -> None:
    seen: list[tuple[int, float, float, str, str]] = []

    async def dead_yet() -> bool:
        (_, _, status, attempts, next_at, last_status, error), = (await rows(inbox)).values()
        if status == "pending" and attempts:
            seen.append((attempts, next_at, time.time(), last_status, error))
        return status == "dead"

    async with FakeMllp(default="AR") as fake:
        await accept_all(inbox, [inbound(["down"], "p1")])
        backend = mllp(fake)
        gate = dispatcher(inbox, [backend], DeliveryPolicy(
            max_attempts=3, retry_base=0.3, retry_max_delay=0.3))
        await gate.start()
        try:
            await eventually(dead_yet)
        finally:
            await gate.close()
            await backend.close()
    # Between attempts the row waits, pending, its next attempt scheduled ahead (full
    # jitter: up to retry_base * 2**(attempt-1), capped).
    assert seen and {a for a, *_ in seen} <= {1, 2}
    assert {(s, e) for *_, s, e in seen} == {("ACK AR", "ACK AR")}
    assert any(next_at > when for _, next_at, when, *_ in seen)
    assert all(next_at <= when + 0.3 for _, next_at, when, *_ in seen)
    ((_, _, status, attempts, _, last_status, error),) = (await rows(inbox)).values()
    assert (status, attempts, error) == ("dead", 3, "gave up after 3 attempts: ACK AR")
    # Every attempt carried the same control id, for the system to recognise a resend.
    assert len(fake.received) == 3 and len(set(fake.control_ids)) == 1
    assert gate.pending("down") == 0


async def test_an_ae_dead_letters_at_once_and_holds_the_patients_later_rows(
        inbox: SqliteInbox, tmp_path: Path) -> None:
    async with FakeMllp(default="AE") as fake:
        await accept_all(inbox, [inbound(["down"], "p1"), inbound(["down"], "p1"),
                                 inbound(["down"], "p2")])
        backend = mllp(fake)
        gate = dispatcher(inbox, [backend])
        await gate.start()
        try:
            await gate.drain(5)
            found = list((await rows(inbox)).values())
            dead = ("dead", 1, "ACK AE", "ACK AE (ERR-3 207, ERR-4 E)")
            # p1's second message waits behind its dead letter, never sent; p2 is apart.
            assert [(r[2], r[3], r[5], r[6]) for r in found] == [
                dead, ("pending", 0, "", ""), dead]
            assert len(fake.received) == 2
            assert gate.pending("down") == 1
            # Dropping the dead letter releases what it held.
            async with open_outbox(tmp_path / "inbox.db") as cli:
                assert await cli.drop([1]) == 1
            await eventually(lambda: _status_of(inbox, 2, "dead"))
        finally:
            await gate.close()
            await backend.close()
    assert len(fake.received) == 3


async def test_a_dead_letter_holds_its_patient_across_a_restart_until_retried(
        tmp_path: Path) -> None:
    path = tmp_path / "inbox.db"
    inbox = await SqliteInbox.open(path, synchronous="normal")
    try:
        ehr = Recorder(answers=[Permanent("HTTP 422", status="HTTP 422")])
        await accept_all(inbox, [inbound(["ehr"], p, bundle=b"{}") for p in "PPQP"])
        gate = dispatcher(inbox, [ehr])
        await gate.start()
        try:
            await gate.drain(5)
        finally:
            await gate.close()
        assert [d.outbox_id for d in ehr.got] == [1, 3]
        outbox = SqliteOutbox(inbox.connection)
        assert [r.id for r in await outbox.due("ehr", "fhir", 0, 10)] == []
        assert await outbox.count_pending("ehr") == 2
        assert await outbox.count_due("ehr", 4) == 0
    finally:
        await inbox.close()

    inbox = await SqliteInbox.open(path, synchronous="normal")
    try:
        ehr = Recorder()
        gate = dispatcher(inbox, [ehr])
        await gate.start()
        try:
            await gate.drain(5)
            assert ehr.got == []  # still held after the restart
            async with open_outbox(path) as cli:
                assert await cli.retry([1]) == 1
            await eventually(lambda: _all_status(inbox, "delivered"))
        finally:
            await gate.close()
        assert [d.outbox_id for d in ehr.got] == [1, 2, 4]  # in order
    finally:
        await inbox.close()


async def test_a_row_failing_on_its_own_does_not_slow_the_others(inbox: SqliteInbox) -> None:
    """A `message` fault (the backend answered, refusing a row that failed before) keeps
    the worker at full pace; a `backend` fault sends one row at a time."""
    gate_open = asyncio.Event()
    in_flight = 0
    peak = 0

    @dataclass
    class Slow(Recorder):
        async def deliver(self, delivery: Delivery) -> Verdict:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                if delivery.outbox_id == 2:
                    return Retry("HTTP 500", status="HTTP 500", fault="message")
                if delivery.outbox_id > 2:
                    await gate_open.wait()
                return Delivered("HTTP 200")
            finally:
                in_flight -= 1

    ehr = Slow()
    await accept_all(inbox, [inbound(["ehr"], "first", bundle=b"{}"),
                             inbound(["ehr"], "poison", bundle=b"{}")])
    gate = dispatcher(inbox, [ehr], DeliveryPolicy(max_attempts=3, retry_base=0.01,
                                                   retry_max_delay=0.01, concurrency=8))
    await gate.start()
    try:
        await eventually(lambda: _status_of(inbox, 2, "dead"))
        await accept_all(inbox, [inbound(["ehr"], f"p{n}", bundle=b"{}") for n in range(8)])
        gate.queued(("ehr",) * 8)
        await eventually(lambda: _at_least(lambda: peak, 8))
        gate_open.set()
        await gate.drain(5)
    finally:
        gate_open.set()
        await gate.close()


async def _at_least(value: Callable[[], int], n: int) -> bool:
    return value() >= n


@pytest.mark.parametrize("mode", ["malformed", "wrong-id", "late", "drop", "AR"])
async def test_no_bad_answer_ever_counts_as_delivered(inbox: SqliteInbox, mode: str) -> None:
    async with FakeMllp(default=mode, late_delay=0.4) as fake:
        await accept_all(inbox, [inbound(["down"], "p1")])
        backend = mllp(fake, ack_timeout=0.2)
        gate = dispatcher(inbox, [backend], DeliveryPolicy(
            max_attempts=2, retry_base=0.01, retry_max_delay=0.01))
        await gate.start()
        try:
            await eventually(lambda: _all_status(inbox, "dead"))
        finally:
            await gate.close()
            await backend.close()
    ((*_, error),) = (await rows(inbox)).values()
    assert error.startswith("gave up after 2 attempts: ")


async def test_while_the_breaker_is_open_nothing_is_sent(inbox: SqliteInbox) -> None:
    fake = FakeMllp()
    await fake.start()
    await fake.stop()
    backend = mllp(fake, breaker_failures=3, breaker_reset=5.0)
    await accept_all(inbox, [inbound(["down"], f"p{n}") for n in range(30)])
    gate = dispatcher(inbox, [backend])
    await gate.start()
    try:
        # Deliberate: ten polls' worth of time (retry delays of at most 0.05 s) in which the
        # open breaker must send nothing.
        await asyncio.sleep(0.5)
        found = (await rows(inbox)).values()
        assert sum(r[3] for r in found) == 3
        assert backend.available_in() > 4
    finally:
        await gate.close()
        await backend.close()


async def test_full_at_the_cap(inbox: SqliteInbox) -> None:
    fake = FakeMllp()
    await fake.start()
    await fake.stop()
    backend = mllp(fake, breaker_failures=1, breaker_reset=30)
    gate = dispatcher(inbox, [backend], DeliveryPolicy(outbox_cap=3))
    await accept_all(inbox, [inbound(["down"], "p1") for _ in range(2)])
    await gate.start()
    try:
        assert gate.pending("down") == 2
        assert not gate.full(("down",))
        await accept_all(inbox, [inbound(["down"], "p1")])
        gate.queued(("down",))
        assert gate.full(("down",)) and gate.full(("local", "down"))
        assert not gate.full(("elsewhere",)) and not gate.full(())
        # Polls re-read the count from the store.
        await eventually(lambda: gate.pending("down") == 3, what="the count re-read")
        assert gate.full(("down",))
    finally:
        await gate.close()
        await backend.close()


async def test_rows_in_flight_at_close_stay_pending_and_go_after_a_restart(
        tmp_path: Path) -> None:
    path = tmp_path / "inbox.db"
    async with FakeMllp(default="silent") as fake:
        inbox = await SqliteInbox.open(path, synchronous="normal")
        await accept_all(inbox, [inbound(["down"], f"p{n % 3}") for n in range(12)])
        backend = mllp(fake, ack_timeout=10.0)
        gate = dispatcher(inbox, [backend])
        await gate.start()
        await eventually(lambda: _received(fake, 1))
        await gate.close()
        await backend.close()
        assert all(r[2:4] == ("pending", 0) for r in (await rows(inbox)).values())
        await inbox.close()

        fake.default = "AA"
        fake.received.clear()
        inbox = await SqliteInbox.open(path, synchronous="normal")
        backend = mllp(fake)
        gate = dispatcher(inbox, [backend])
        await gate.start()
        try:
            await gate.drain(5)
            assert await _all_status(inbox, "delivered")
        finally:
            await gate.close()
            await backend.close()
            await inbox.close()
    assert sorted(fake.control_ids) == [control_id_for(n) for n in range(1, 13)]


async def _received(fake: FakeMllp, n: int) -> bool:
    return len(fake.received) >= n


async def test_operator_changes_are_picked_up_by_the_running_dispatcher(
        inbox: SqliteInbox, tmp_path: Path) -> None:
    async with FakeMllp(default="AE") as fake:
        await accept_all(inbox, [inbound(["down"], "p1"), inbound(["down"], "p2")])
        backend = mllp(fake)
        gate = dispatcher(inbox, [backend])
        await gate.start()
        try:
            await gate.drain(5)
            assert await _all_status(inbox, "dead")
            fake.default = "AA"
            async with open_outbox(tmp_path / "inbox.db") as cli:
                assert await cli.retry(None, backend="down") == 2
            await eventually(lambda: _all_status(inbox, "delivered"))
        finally:
            await gate.close()
            await backend.close()
    assert len(fake.received) == 4


# -- the dispatcher: FHIR-kind rows, exceptions -----------------------------------------


async def test_fhir_rows_carry_the_bundle_and_a_row_without_one_is_dead(
        inbox: SqliteInbox) -> None:
    ehr = Recorder()
    ids = await accept_all(inbox, [inbound(["ehr"], "p1", bundle=b'{"resourceType": 1}'),
                                   inbound(["ehr"], "p1")])
    gate = dispatcher(inbox, [ehr])
    await gate.start()
    try:
        await gate.drain(5)
    finally:
        await gate.close()
    (got,) = ehr.got
    assert (got.payload, got.inbox_id, got.attempt) == (b'{"resourceType": 1}', ids[0], 1)
    assert got.control_id == control_id_for(got.outbox_id)
    found = list((await rows(inbox)).values())
    assert [(r[2], r[5]) for r in found] == [("delivered", "HTTP 200"), ("dead", "not sent")]
    assert found[1][6] == "no translated bundle"


async def test_retry_after_is_honoured_and_an_exception_is_a_retry(
        inbox: SqliteInbox) -> None:
    ehr = Recorder(answers=[Retry("HTTP 503", after=30.0, status="HTTP 503"),
                            RuntimeError("a message that might hold anything"),
                            RuntimeError("a message that might hold anything")])
    await accept_all(inbox, [inbound(["ehr"], "p1", bundle=b"{}"),
                             inbound(["ehr"], "p1", bundle=b"{}"),
                             inbound(["ehr"], "", bundle=b"{}")])
    gate = dispatcher(inbox, [ehr], DeliveryPolicy(max_attempts=2, retry_base=0.01))
    await gate.start()
    try:
        await gate.drain(5)
        await eventually(lambda: _status_of(inbox, 3, "dead"))
        await asyncio.sleep(0.1)  # deliberate quiet time: nothing more may be sent
    finally:
        await gate.close()
    first, second, third = (await rows(inbox)).values()
    assert first[2:4] == ("pending", 1) and first[4] >= time.time() + 25
    assert second[2:4] == ("pending", 0)  # held back behind the first, same patient
    assert third[2:4] == ("dead", 2)
    assert third[6] == "gave up after 2 attempts: RuntimeError"  # the type, not the text
    assert [d.outbox_id for d in ehr.got] == [1, 3, 3]


async def _status_of(inbox: SqliteInbox, outbox_id: int, status: str) -> bool:
    return (await rows(inbox))[outbox_id][2] == status


async def test_drain_waits_for_results_being_written(inbox: SqliteInbox) -> None:
    """One patient: every delivery waits for the previous one's result to be on disk."""
    ehr = Recorder()
    await accept_all(inbox, [inbound(["ehr"], "p1", bundle=b"{}") for _ in range(300)])
    gate = dispatcher(inbox, [ehr], poll=5.0)
    await gate.start()
    try:
        await gate.drain(10)
        assert await _all_status(inbox, "delivered")
        assert gate.pending("ehr") == 0
    finally:
        await gate.close()
    assert [d.outbox_id for d in ehr.got] == list(range(1, 301))


# -- throughput --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["recorder", "mllp"])
async def test_a_5000_row_backlog_drains_completely(inbox: SqliteInbox, kind: str) -> None:
    """Correctness under volume only: the drain rate is a benchmark figure
    (`bench/forward.py --drain-only`), never a timed assertion in a test."""
    count = 5000
    await accept_all(inbox, [inbound(["ehr" if kind == "recorder" else "down"],
                                     f"p{n % 100}", bundle=b"{}") for n in range(count)])
    async with FakeMllp() as fake:
        backend: Backend = Recorder() if kind == "recorder" else mllp(fake)
        gate = dispatcher(inbox, [backend], DeliveryPolicy(concurrency=64), poll=1.0)
        await gate.start()
        try:
            await gate.drain(60)
            assert await _all_status(inbox, "delivered")
        finally:
            await gate.close()
            await backend.close()


# -- metrics -----------------------------------------------------------------------------


async def test_depth_age_and_deliveries_are_measured(inbox: SqliteInbox) -> None:
    reader = InMemoryMetricReader()
    telemetry = configure("none", metric_reader=reader)
    ehr = Recorder(answers=[Permanent("HTTP 422", status="HTTP 422")])
    await accept_all(inbox, [inbound(["ehr"], "", bundle=b"{}") for _ in range(3)])
    gate = Dispatcher(SqliteOutbox(inbox.connection), {"ehr": ehr}, {}, telemetry,
                      poll_interval=0.05)
    assert _points(reader)["isthmus.outbox.depth"] == {(("forward.backend", "ehr"),): 0}
    await gate.start()
    try:
        await gate.drain(5)
    finally:
        await gate.close()
    points = _points(reader)
    telemetry.shutdown()
    assert points["isthmus.outbox.depth"] == {(("forward.backend", "ehr"),): 0}
    assert points["isthmus.outbox.oldest_age_seconds"] == {(("forward.backend", "ehr"),): 0}
    assert points["isthmus.outbox.deliveries"] == {
        (("forward.backend", "ehr"), ("forward.verdict", "delivered")): 2,
        (("forward.backend", "ehr"), ("forward.verdict", "permanent")): 1}
    assert points["isthmus.outbox.delivery_ms"] == {(("forward.backend", "ehr"),): 3}


def _points(reader: InMemoryMetricReader) -> dict[str, dict[tuple[tuple[str, Any], ...], Any]]:
    """metric name -> attributes -> value (a histogram's: its count)."""
    out: dict[str, dict[tuple[tuple[str, Any], ...], Any]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    out.setdefault(metric.name, {})[tuple(sorted(
                        (point.attributes or {}).items()))] = (
                        value if value is not None else getattr(point, "count", None))
    return out
