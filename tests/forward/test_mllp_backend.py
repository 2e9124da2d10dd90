"""The downstream MLLP backend: only an AA/CA answering our own MSH-10 is a delivery.

Every test talks to a fake downstream system on a real 127.0.0.1 socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import MESSAGES, message
from gateway.forward.backend import Delivered, Delivery, Permanent, Retry
from gateway.forward.mllp_backend import MllpBackend, MllpBackendSpec, set_control_id
from gateway.telemetry import Telemetry, configure
from support.fake_mllp import FakeMllp, control_id_of
from support.wait import eventually

ADT = message("adt_a01.hl7")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ACK_TIMEOUT = 0.3


def delivery(outbox_id: int = 1, attempt: int = 1, payload: bytes = ADT,
             traceparent: str = "") -> Delivery:
    return Delivery(outbox_id, inbox_id=outbox_id, backend="legacy", attempt=attempt,
                    payload=payload, control_id=f"ISM{outbox_id:017d}",
                    traceparent=traceparent)


def backend_for(fake: FakeMllp, telemetry: Telemetry | None = None,
                **spec: object) -> MllpBackend:
    values: dict[str, Any] = {"ack_timeout": ACK_TIMEOUT, "connect_timeout": 1.0,
                                 "breaker_failures": 50, **spec}
    return MllpBackend(MllpBackendSpec("legacy", "127.0.0.1", fake.port, **values),
                       telemetry or configure("none"))


@pytest.fixture
async def fake() -> AsyncIterator[FakeMllp]:
    async with FakeMllp(late_delay=ACK_TIMEOUT + 0.3) as running:
        yield running


@pytest.mark.parametrize(
    ("mode", "verdict", "status", "reason"),
    [
        ("AA", Delivered, "ACK AA", None),
        ("CA", Delivered, "ACK CA", None),
        ("AE", Permanent, "ACK AE", "ACK AE (ERR-3 207, ERR-4 E)"),
        ("CE", Permanent, "ACK CE", "ACK CE (ERR-3 207, ERR-4 E)"),
        ("AR", Retry, "ACK AR", "ACK AR"),
        ("CR", Retry, "ACK CR", "ACK CR"),
        ("malformed", Retry, "malformed ACK", "malformed ACK"),
        ("wrong-id", Retry, "timeout", f"no ACK within {ACK_TIMEOUT:g} s"),
        ("late", Retry, "timeout", f"no ACK within {ACK_TIMEOUT:g} s"),
        ("silent", Retry, "timeout", f"no ACK within {ACK_TIMEOUT:g} s"),
        ("drop", Retry, "connection closed",
         "connection lost before the ACK (ConnectionResetError)"),
    ],
)
async def test_only_aa_or_ca_for_our_control_id_counts_as_delivered(
        fake: FakeMllp, mode: str, verdict: type, status: str, reason: str | None) -> None:
    fake.default = mode
    backend = backend_for(fake)
    try:
        result = await backend.deliver(delivery(7))
    finally:
        await backend.close()
    assert type(result) is verdict
    assert result.status == status
    if reason is not None:
        assert not isinstance(result, Delivered)
        assert result.reason == reason
    # Sent once, as our control id; the error's free text is never repeated.
    assert fake.control_ids == ["ISM00000000000000007"]
    assert "SECRET" not in repr(result) and "internal error" not in repr(result)


async def test_an_ack_for_an_earlier_message_is_passed_over(fake: FakeMllp) -> None:
    fake.default = "stale-first"
    backend = backend_for(fake)
    try:
        assert await backend.deliver(delivery(1)) == Delivered("ACK AA")
        assert await backend.deliver(delivery(2)) == Delivered("ACK AA")
    finally:
        await backend.close()
    assert backend.connections == 1


@pytest.mark.parametrize("mode", ["late", "malformed", "wrong-id"])
async def test_after_a_timeout_or_garbage_the_connection_is_replaced(
        fake: FakeMllp, mode: str) -> None:
    """A late ACK can never be read as the answer to the next message: the connection it
    would arrive on is closed."""
    fake.script(mode)
    backend = backend_for(fake)
    try:
        assert isinstance(await backend.deliver(delivery(1)), Retry)
        if mode == "late":
            await eventually(lambda: fake.late_written == 1, what="the late ACK")
        assert await backend.deliver(delivery(2)) == Delivered("ACK AA")
    finally:
        await backend.close()
    assert backend.connections == 2
    assert fake.control_ids == ["ISM00000000000000001", "ISM00000000000000002"]


async def test_connection_refused_is_a_retry_and_a_restarted_system_is_reconnected(
        fake: FakeMllp) -> None:
    backend = backend_for(fake)
    try:
        assert await backend.deliver(delivery(1)) == Delivered("ACK AA")
        await fake.stop()
        down = await backend.deliver(delivery(2))
        assert isinstance(down, Retry) and down.status == "not connected"
        await fake.start()  # same port
        assert await backend.deliver(delivery(2)) == Delivered("ACK AA")
        # The system restarting between two messages (idle connection closed) is no
        # failure: the next message goes on a new connection.
        await fake.restart()
        # Deliberate: time for the restart's close to reach the idle connection (nothing
        # observable on our side says it has; the backend must cope either way).
        await asyncio.sleep(0.05)
        assert await backend.deliver(delivery(3)) == Delivered("ACK AA")
    finally:
        await backend.close()
    assert fake.control_ids == [f"ISM{n:017d}" for n in (1, 2, 3)]


async def test_breaker_opens_after_failures_and_a_probe_closes_it(fake: FakeMllp) -> None:
    fake.default = "AR"
    backend = backend_for(fake, breaker_failures=2, breaker_reset=0.3)
    try:
        for n in (1, 2):
            assert await backend.deliver(delivery(n)) == Retry("ACK AR", status="ACK AR")
        refused = await backend.deliver(delivery(3))
        assert isinstance(refused, Retry) and refused.reason == "circuit breaker open"
        assert refused.after is not None and 0 < refused.after <= 0.3
        assert backend.available_in() > 0
        assert len(fake.received) == 2  # not even a connection attempt
        fake.default = "AA"
        # The reset timeout is the behaviour under test; the breaker reads the wall clock.
        await asyncio.sleep(backend.available_in() + 0.01)
        assert await backend.deliver(delivery(3)) == Delivered("ACK AA")
        assert backend.breaker_state == "closed"
    finally:
        await backend.close()


async def test_a_message_refused_again_does_not_open_the_breaker(fake: FakeMllp) -> None:
    """AR to a message that was refused before is that message's problem (a poison
    message): the breaker stays closed however often; a fresh message's AR counts."""
    fake.default = "AR"
    backend = backend_for(fake, breaker_failures=2, breaker_reset=30.0)
    try:
        assert await backend.deliver(delivery(1)) == Retry("ACK AR", status="ACK AR")
        for attempt in range(2, 10):
            assert await backend.deliver(delivery(1, attempt)) == Retry(
                "ACK AR", status="ACK AR", fault="message")
        assert backend.breaker_state == "closed"
        assert (await backend.deliver(delivery(2))).fault == "backend"
        assert backend.breaker_state == "open"
    finally:
        await backend.close()
    assert len(fake.received) == 10


async def test_ae_is_the_system_answering_so_it_does_not_open_the_breaker(
        fake: FakeMllp) -> None:
    fake.default = "AE"
    backend = backend_for(fake, breaker_failures=2)
    try:
        for n in range(1, 5):
            assert isinstance(await backend.deliver(delivery(n)), Permanent)
    finally:
        await backend.close()
    assert backend.breaker_state == "closed"
    assert len(fake.received) == 4


async def test_rate_limit_spaces_deliveries(fake: FakeMllp) -> None:
    backend = backend_for(fake, rate_limit="5/second")  # burst 1: one each 0.2 s
    started = time.monotonic()
    try:
        for n in (1, 2, 3):
            assert await backend.deliver(delivery(n)) == Delivered("ACK AA")
    finally:
        await backend.close()
    assert time.monotonic() - started >= 0.38


async def test_one_message_at_a_time_on_one_connection(fake: FakeMllp) -> None:
    backend = backend_for(fake)
    try:
        results = await asyncio.gather(*(backend.deliver(delivery(n)) for n in range(1, 21)))
    finally:
        await backend.close()
    assert all(r == Delivered("ACK AA") for r in results)
    assert backend.connections == 1 and fake.connections == 1
    assert sorted(fake.control_ids) == [f"ISM{n:017d}" for n in range(1, 21)]


async def test_attempt_span_is_a_child_of_the_message_trace(
        fake: FakeMllp, caplog: pytest.LogCaptureFixture) -> None:
    spans = InMemorySpanExporter()
    telemetry = configure("none", span_exporter=spans)
    backend = backend_for(fake, telemetry)
    caplog.set_level(logging.DEBUG, logger="gateway.forward.mllp_backend")
    try:
        assert await backend.deliver(delivery(5, attempt=3, traceparent=TRACEPARENT)) \
            == Delivered("ACK AA")
        fake.default = "AR"
        await backend.deliver(delivery(6))
    finally:
        await backend.close()
        telemetry.shutdown()
    first, second = spans.get_finished_spans()
    assert first.name == "forward.attempt" and first.kind is trace.SpanKind.CLIENT
    assert first.parent is not None
    assert f"{first.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{first.parent.span_id:016x}" == "b7ad6b7169203331"
    assert dict(first.attributes or {}) == {
        "forward.backend": "legacy", "forward.kind": "mllp", "forward.attempt": 3,
        "forward.breaker_state": "closed", "outbox.id": 5,
        "hl7.control_id": "ISM00000000000000005", "hl7.ack_code": "AA",
        "forward.verdict": "delivered", "server.address": "127.0.0.1",
        "server.port": fake.port}
    assert second.parent is None  # no traceparent: a root span
    assert second.attributes is not None and second.attributes["forward.verdict"] == "retry"
    assert second.status.status_code is trace.StatusCode.ERROR
    assert ("outbox 5 delivered as ISM00000000000000005 trace "
            "0af7651916cd43dd8448eb211c80319c") in caplog.messages


@pytest.mark.parametrize("name", sorted(p.name for p in MESSAGES.glob("*.hl7")
                                        if p.read_bytes().lstrip(b"\xef\xbb\xbf")
                                        .startswith(b"MSH")))
def test_msh10_is_replaced_and_every_other_byte_kept(name: str) -> None:
    raw = (MESSAGES / name).read_bytes()
    original = control_id_of(raw.removeprefix(b"\xef\xbb\xbf"))
    rewritten = set_control_id(raw, "ISM00000000000000042")
    assert control_id_of(rewritten.removeprefix(b"\xef\xbb\xbf")) == "ISM00000000000000042"
    assert set_control_id(rewritten, original) == raw
    assert len(rewritten) == len(raw) - len(original) + 20


def test_a_short_msh_is_padded_to_msh10_and_no_msh_is_refused() -> None:
    assert set_control_id(b"MSH#^~\\&#A#B\rPID#1", "X1") == b"MSH#^~\\&#A#B######X1\rPID#1"
    with pytest.raises(ValueError):
        set_control_id(b"PID|1\r", "X1")


async def test_a_stored_message_without_msh_is_permanent(fake: FakeMllp,
                                                         tmp_path: Path) -> None:
    backend = backend_for(fake)
    try:
        result = await backend.deliver(delivery(1, payload=b"not hl7"))
    finally:
        await backend.close()
    assert isinstance(result, Permanent) and fake.received == []
