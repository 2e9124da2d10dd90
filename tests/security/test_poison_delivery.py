"""Issue 13, item 13: one poison message must not hold every patient's deliveries.

A real gateway (HL7 in over MLLP, out to a FHIR backend) and a fake EHR on 127.0.0.1 that
answers HTTP 500 to every Bundle of one patient and 2xx to the rest. What is measured is
what the others feel: each healthy message's latency from the moment its frame is sent
to the moment the EHR receives its Bundle, without the poison patient and with it (while
its head row is failing, then once it is dead-lettered), in the same run. The bound is
`LATENCY_BOUND` seconds for every healthy message in every phase, far under the breaker
reset (`BREAKER_RESET`, 10 s: the 10-30 s wait of the issue); the figures are printed.

The poison patient's later messages wait behind its dead letter, in order, and
`isthmus outbox retry` of the dead letter releases them, in order.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import MllpPeer, RunningGateway, message, segments, start_gateway
from gateway.app.state import FORWARDING
from gateway.forward.outbox import Dispatcher, control_id_for
from gateway.store.outbox import SqliteOutbox
from support.cli import isthmus
from support.fake_ehr import FakeEhr
from support.fake_mllp import FakeMllp

ADT = message("adt_a01.hl7")
POISON = 900
HEALTHY = range(1, 21)
BREAKER_RESET = 10.0
# Every healthy message is delivered within this many seconds of being sent, with or
# without the poison patient (measured: tens of milliseconds; see the printed figures).
LATENCY_BOUND = 2.0
MAX_ATTEMPTS = 12


def _adt(patient: int, sequence: int) -> bytes:
    """adt_a01.hl7 for synthetic patient `patient`, control id naming both numbers."""
    text = ADT.replace(b"MRN-100001", f"MRN-{patient:06d}".encode())
    return text.replace(b"CTRL-ADT-0001", f"CTRL-P{patient:03d}-{sequence:05d}".encode())


def _control_id(patient: int, sequence: int) -> str:
    return f"CTRL-P{patient:03d}-{sequence:05d}"


async def _send(port: int, messages: list[bytes]) -> dict[str, float]:
    """Send one by one over one connection; control id -> when its frame went out."""
    peer = await MllpPeer.open(port)
    sent: dict[str, float] = {}
    try:
        for item in messages:
            found = re.search(rb"CTRL-P\d{3}-\d{5}", item)
            assert found is not None
            sent[found.group().decode()] = time.monotonic()
            await peer.send(item)
            assert segments(await peer.reply(timeout=10))["MSA"][0][1] == "AA"
    finally:
        await peer.close()
    return sent


def _arrivals(fake: FakeEhr) -> dict[str, float]:
    """control id -> when the EHR first accepted a Bundle carrying it."""
    arrived: dict[str, float] = {}
    for received in fake.transactions:
        found = re.search(rb"CTRL-P\d{3}-\d{5}", received.body)
        if found is not None:
            arrived.setdefault(found.group().decode(), received.received_at)
    return arrived


async def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


async def _healthy_round(running: RunningGateway, fake: FakeEhr,
                         sequence: int) -> list[float]:
    """One message for every healthy patient; their latencies (s), all within the bound
    (waited for no longer than that: a breaker held open by the poison fails here)."""
    ids = [_control_id(p, sequence) for p in HEALTHY]
    sent = await _send(running.mllp_port, [_adt(p, sequence) for p in HEALTHY])
    await _wait_for(lambda: set(ids) <= set(_arrivals(fake)), LATENCY_BOUND + 1,
                    f"round {sequence} of healthy deliveries")
    arrived = _arrivals(fake)
    return [arrived[i] - sent[i] for i in ids]


def _figures(latencies: list[float]) -> str:
    return (f"p50 {statistics.median(latencies) * 1000:.0f} ms, "
            f"max {max(latencies) * 1000:.0f} ms")


def _attempts_of(fake: FakeEhr, request_ids: set[str]) -> int:
    return sum(1 for r in fake.requests if r.request_id in request_ids)


async def _outbox_ids(running: RunningGateway, patient: int) -> list[int]:
    """The outbox row ids of a patient's messages, in order."""
    entries = await SqliteOutbox(running.inbox.connection).list_entries(limit=1000)
    prefix = f"CTRL-P{patient:03d}-"
    return sorted(e.id for e in entries if e.control_id.startswith(prefix))


async def _statuses(running: RunningGateway, ids: list[int]) -> list[str]:
    outbox = SqliteOutbox(running.inbox.connection)
    found = [await outbox.get(i) for i in ids]
    return [e.status if e is not None else "missing" for e in found]


def _dispatcher(running: RunningGateway) -> Dispatcher:
    dispatcher = running.app[FORWARDING].dispatcher
    assert dispatcher is not None
    return dispatcher


def _backend(fake: FakeEhr, **extra: Any) -> dict[str, Any]:
    # breaker_failures stays at its default (5); backoff short so the test is short.
    return {"name": "ehr", "kind": "fhir", "base_url": fake.url, "backoff_base": 0.05,
            "retry_max_delay": 0.25, "breaker_reset": BREAKER_RESET,
            "max_attempts": MAX_ATTEMPTS, **extra}


async def test_one_poison_patient_neither_delays_the_others_nor_loses_its_order(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with FakeEhr() as fake:
        fake.fail_bodies_with(f"MRN-{POISON:06d}".encode(), 500)
        running = await start_gateway(
            tmp_path / "var", backends=[_backend(fake)],
            routes=[{"match": {"message": "ADT^*"}, "to": ["ehr"]}],
            **{"forward.poll_interval": 0.1, "audit.enabled": False})
        try:
            baseline = await _healthy_round(running, fake, 1)

            # The poison patient's three messages: the first is answered 500 on every
            # attempt; the others must wait behind it.
            await _send(running.mllp_port, [_adt(POISON, s) for s in (1, 2, 3)])
            poison_rows = await _outbox_ids(running, POISON)
            assert len(poison_rows) == 3
            head = {f"isthmus-outbox-{poison_rows[0]}"}
            # More consecutive failures than breaker_failures, with nothing else to send.
            await _wait_for(lambda: _attempts_of(fake, head) >= 5, 10,
                            "the poison row's failures")
            assert (await _statuses(running, poison_rows[:1])) == ["pending"]
            while_failing = await _healthy_round(running, fake, 2)

            await _wait_for(lambda: _attempts_of(fake, head) >= MAX_ATTEMPTS, 30,
                            "the poison row's last attempt")
            await _wait_for(lambda: _dispatcher(running).pending("ehr") <= 2, 5,
                            "the dead letter")
            dead = await _outbox_ids(running, POISON)
            assert (await _statuses(running, dead)) == ["dead", "pending", "pending"]
            entry = await SqliteOutbox(running.inbox.connection).get(dead[0])
            assert entry is not None
            assert entry.error == f"gave up after {MAX_ATTEMPTS} attempts: HTTP 500"
            after_dead = await _healthy_round(running, fake, 3)
            # The later rows were never sent: they wait behind the dead letter.
            later = {f"isthmus-outbox-{i}" for i in poison_rows[1:]}
            assert _attempts_of(fake, later) == 0

            with capsys.disabled():
                print(f"\nhealthy delivery latency, {len(HEALTHY)} patients: "
                      f"without the poison patient {_figures(baseline)}; "
                      f"while it fails {_figures(while_failing)}; "
                      f"after its dead letter {_figures(after_dead)}")
            for latencies in (baseline, while_failing, after_dead):
                assert max(latencies) <= LATENCY_BOUND

            # The EHR is fixed; the operator retries the dead letter beside the running
            # gateway: the patient's three messages arrive, in order.
            fake.fail_bodies_with(None)
            code, out, err = await isthmus("outbox", "--data-dir", str(running.data_dir),
                                           "retry", str(dead[0]))
            assert code == 0, err
            assert out.strip() == "1 deliveries set to pending"
            expected = [_control_id(POISON, s) for s in (1, 2, 3)]
            await _wait_for(lambda: set(expected) <= set(_arrivals(fake)), 10,
                            "the poison patient's messages after the retry")
            order = [found.group().decode() for t in fake.transactions
                     if (found := re.search(rb"CTRL-P900-\d{5}", t.body)) is not None]
            assert order == expected
            assert (await _statuses(running, dead)) == ["delivered"] * 3
        finally:
            await running.runner.cleanup()


async def test_the_probe_after_a_breaker_reset_is_a_row_that_has_not_been_failing(
        tmp_path: Path) -> None:
    """The breaker opens for a real outage (connection refused); when it lets a probe
    through, the probe is a message that has not been failing, not the poison row that
    would fail it again."""
    async with FakeEhr() as fake:
        fake.fail_bodies_with(f"MRN-{POISON:06d}".encode(), 500)
        running = await start_gateway(
            tmp_path / "var", backends=[_backend(fake, breaker_failures=2,
                                                 breaker_reset=1.0, max_attempts=1000)],
            routes=[{"match": {"message": "ADT^*"}, "to": ["ehr"]}],
            **{"forward.poll_interval": 0.1, "audit.enabled": False})
        try:
            await _send(running.mllp_port, [_adt(POISON, 1)])
            (poison_row,) = await _outbox_ids(running, POISON)
            head = {f"isthmus-outbox-{poison_row}"}
            await _wait_for(lambda: _attempts_of(fake, head) >= 3, 10,
                            "the poison row's failures")
            await fake.stop()  # the EHR goes down: refused connections open the breaker
            backend = running.app[FORWARDING].backends["ehr"]
            await _wait_for(lambda: backend.available_in() > 0, 10, "the breaker to open")
            seen = len(fake.requests)
            # Sent while the breaker is open: not tried yet.
            sent = await _send(running.mllp_port, [_adt(p, 1) for p in HEALTHY])
            await fake.start()
            ids = [_control_id(p, 1) for p in HEALTHY]
            await _wait_for(lambda: set(ids) <= set(_arrivals(fake)),
                            1.0 + LATENCY_BOUND + 1, "the healthy deliveries")
            probe = fake.requests[seen]
            assert probe.request_id not in head
            arrived = _arrivals(fake)
            assert max(arrived[i] - sent[i] for i in ids) <= 1.0 + LATENCY_BOUND
        finally:
            await running.runner.cleanup()


async def test_an_mllp_system_answering_ar_to_one_message_holds_only_that_patient(
        tmp_path: Path) -> None:
    """The same for a downstream MLLP system that answers AR to one patient's message on
    every attempt (and AA to the rest): an answer, not a dead socket."""
    lab = await FakeMllp().start()
    running = await start_gateway(
        tmp_path / "var",
        backends=[{"name": "lab", "kind": "mllp", "host": "127.0.0.1", "port": lab.port,
                   "read_timeout": 2, "backoff_base": 0.05, "retry_max_delay": 0.25,
                   "breaker_reset": BREAKER_RESET, "max_attempts": MAX_ATTEMPTS}],
        routes=[{"match": {"message": "ADT^*"}, "to": ["lab"]}],
        **{"forward.poll_interval": 0.1, "audit.enabled": False})

    def arrivals() -> dict[str, float]:
        arrived: dict[str, float] = {}
        for received in lab.received:
            arrived.setdefault(received.control_id, received.received_at)
        return arrived

    async def healthy_round(sequence: int) -> list[float]:
        sent = await _send(running.mllp_port, [_adt(p, sequence) for p in HEALTHY])
        entries = await SqliteOutbox(running.inbox.connection).list_entries(limit=1000)
        ours = {control_id_for(e.id): sent[e.control_id] for e in entries
                if e.control_id in sent}
        assert len(ours) == len(HEALTHY)
        await _wait_for(lambda: set(ours) <= set(arrivals()), LATENCY_BOUND + 1,
                        f"round {sequence} of healthy deliveries")
        arrived = arrivals()
        return [arrived[i] - ours[i] for i in ours]

    try:
        # A fresh data dir: the poison patient's three messages are outbox rows 1-3.
        poison = [control_id_for(n) for n in (1, 2, 3)]
        lab.by_id[poison[0]] = "AR"
        await _send(running.mllp_port, [_adt(POISON, s) for s in (1, 2, 3)])
        await _wait_for(lambda: lab.control_ids.count(poison[0]) >= 5, 10,
                        "the poison message's refusals")
        assert max(await healthy_round(1)) <= LATENCY_BOUND
        await _wait_for(lambda: _dispatcher(running).pending("lab") <= 2, 30,
                        "the dead letter")
        assert (await _statuses(running, [1, 2, 3])) == ["dead", "pending", "pending"]
        assert lab.control_ids.count(poison[0]) == MAX_ATTEMPTS
        assert max(await healthy_round(2)) <= LATENCY_BOUND
        assert not set(poison[1:]) & set(lab.control_ids)  # held behind the dead letter

        del lab.by_id[poison[0]]
        code, _, err = await isthmus("outbox", "--data-dir", str(running.data_dir),
                                     "retry", "1")
        assert code == 0, err
        await _wait_for(lambda: set(poison) <= set(arrivals()), 10,
                        "the poison patient's messages after the retry")
        assert [c for c in lab.control_ids if c in poison][-3:] == poison
        assert (await _statuses(running, [1, 2, 3])) == ["delivered"] * 3
    finally:
        await running.runner.cleanup()
        await lab.stop()
