"""A downstream MLLP system as an outbox backend: one connection, one message at a time.

A delivery counts only when the system answers our message: MSA-2 equal to the MSH-10 we
sent and MSA-1 AA or CA (HL7 v2.5.1 §2.9: original and enhanced mode). An ACK carrying
another control id (a late answer to an earlier message) is passed over while we keep
waiting; when the wait runs out the connection is closed, so such a late ACK can never be
read as the answer to a later message. AR/CR means "try again later", AE/CE "this message
will not be accepted as it is" (dead-letter it); a malformed ACK or a closed connection
is never a success. A dead socket counts against the system's breaker whatever the
message; an AR (or a malformed ACK) only when the message had not been failing before.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import deque
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.forward.backend import Delivered, Delivery, Fault, Permanent, Retry, Verdict
from gateway.forward.errors import ForwardError
from gateway.forward.mllp_client import MAX_ACK_BYTES, AckResult, parse_ack
from gateway.forward.resilience import Breaker, BreakerOpen, TokenBucket, parse_rate
from gateway.hl7.errors import Hl7Error
from gateway.hl7.message import parse_message
from gateway.hl7.mllp import FrameDecoder, FrameTooLarge, frame
from gateway.telemetry import AttributeValue, Telemetry, set_attributes

log = logging.getLogger(__name__)

KIND = "mllp"
_POSITIVE = frozenset({"AA", "CA"})
_REJECTED = frozenset({"AR", "CR"})  # "resend later"
_ERROR = frozenset({"AE", "CE"})     # "not accepted as it is"
_KNOWN = _POSITIVE | _REJECTED | _ERROR
# An ERR-3 / ERR-4 code worth repeating: a short token, never free text.
_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,20}")
_BOM = b"\xef\xbb\xbf"
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class MllpBackendSpec:
    """Where the downstream system listens and how patient the gateway is with it."""

    name: str
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    connect_timeout: float = 5.0
    ack_timeout: float = 30.0
    breaker_failures: int = 5
    breaker_reset: float = 30.0
    rate_limit: str = ""  # "50/second", "5000/hour"; "" unlimited


class _MalformedAck(ForwardError):
    """A frame that is not a readable ACK (or an oversize one)."""


def set_control_id(raw: bytes, control_id: str) -> bytes:
    """The message with MSH-10 replaced, every other byte kept (the MSH field separator
    is the byte after "MSH"); ValueError if the message does not start with MSH."""
    start = len(_BOM) if raw.startswith(_BOM) else 0
    if raw[start:start + 3] != b"MSH" or len(raw) < start + 4:
        raise ValueError("the message does not start with an MSH segment")
    separator = raw[start + 3:start + 4]
    end = len(raw)
    for terminator in (b"\r", b"\n"):
        found = raw.find(terminator, start)
        if found >= 0:
            end = min(end, found)
    fields = raw[start:end].split(separator)
    # fields[0] is "MSH", fields[1] MSH-2: MSH-n is fields[n - 1].
    fields.extend([b""] * (10 - len(fields)))
    fields[9] = control_id.encode("ascii")
    return raw[:start] + separator.join(fields) + raw[end:]


class MllpBackend:
    """Delivers outbox rows to a downstream MLLP system (kind "mllp")."""

    kind = KIND

    def __init__(self, spec: MllpBackendSpec, telemetry: Telemetry) -> None:
        self.name = spec.name
        self.spec = spec
        self._tracer = telemetry.tracer
        self._breaker = Breaker(spec.name, spec.breaker_failures, spec.breaker_reset,
                                on_change=self._breaker_changed)
        rate = parse_rate(spec.rate_limit)
        self._bucket = TokenBucket(*rate) if rate is not None else None
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = FrameDecoder(MAX_ACK_BYTES)
        self._frames: deque[bytes] = deque()
        self.connections = 0  # connections opened so far (operators' and tests' view)
        self._attributes: dict[str, AttributeValue] = {
            "forward.backend": spec.name, "forward.kind": KIND,
            "server.address": spec.host, "server.port": spec.port}

    @property
    def breaker_state(self) -> str:
        return self._breaker.state

    def available_in(self) -> float:
        return self._breaker.available_in()

    async def deliver(self, delivery: Delivery) -> Verdict:
        """One attempt: send with our MSH-10, wait for the ACK that answers it."""
        async with self._lock:
            parent = (_PROPAGATOR.extract({"traceparent": delivery.traceparent})
                      if delivery.traceparent else None)
            with self._tracer.start_as_current_span(
                    "forward.attempt", context=parent, kind=trace.SpanKind.CLIENT,
                    record_exception=False, set_status_on_exception=False) as span:
                set_attributes(span, {
                    **self._attributes, "forward.attempt": delivery.attempt,
                    "forward.breaker_state": self._breaker.state,
                    "outbox.id": delivery.outbox_id, "hl7.control_id": delivery.control_id})
                verdict, ack_code = await self._attempt(delivery)
                _record(span, verdict, ack_code)
                if isinstance(verdict, Delivered) and log.isEnabledFor(logging.DEBUG):
                    trace_id = span.get_span_context().trace_id
                    log.debug("outbox %d delivered as %s trace %s", delivery.outbox_id,
                              delivery.control_id, f"{trace_id:032x}" if trace_id else "-")
                return verdict

    async def _attempt(self, delivery: Delivery) -> tuple[Verdict, str]:
        try:
            self._breaker.check()
        except BreakerOpen as exc:
            return Retry("circuit breaker open", after=exc.retry_after,
                         status="breaker open", fault="unsent"), ""
        try:
            payload = set_control_id(delivery.payload, delivery.control_id)
        except ValueError:
            self._breaker.release()
            return Permanent("the stored message has no MSH segment", status="not sent"), ""
        try:
            if self._bucket is not None:
                await self._bucket.acquire()
            # A message that has failed before and is refused again is its own problem
            # (a poison message), not evidence that the system is down.
            return await self._exchange(payload, delivery.control_id,
                                        suspect=delivery.attempt > 1)
        except BaseException:  # cancelled: the message may be half sent; start afresh
            self._breaker.release()
            self._drop_connection()
            raise

    async def _exchange(self, payload: bytes, control_id: str,
                        suspect: bool) -> tuple[Verdict, str]:
        try:
            reader, writer = await self._connection()
        except TimeoutError:
            self._breaker.failure()
            return Retry("connect timeout", status="not connected"), ""
        except OSError as exc:
            self._breaker.failure()
            return Retry(f"cannot connect ({type(exc).__name__})", status="not connected"), ""
        timeout = self.spec.ack_timeout
        try:
            async with asyncio.timeout(timeout):
                self._frames.clear()  # whatever came after the previous ACK is stale
                writer.write(frame(payload))
                await writer.drain()
                ack = await self._ack_for(reader, control_id)
        except TimeoutError:
            self._fail_and_disconnect()
            return Retry(f"no ACK within {timeout:g} s", status="timeout"), ""
        except _MalformedAck:
            # An answer, if not a readable one: judged like an AR (the connection is
            # dropped all the same, so nothing left of it is read for the next message).
            self._drop_connection()
            return Retry("malformed ACK", status="malformed ACK",
                         fault=self._answered_failure(suspect)), ""
        except OSError as exc:  # ConnectionError, ssl.SSLError, ...
            self._fail_and_disconnect()
            return Retry(f"connection lost before the ACK ({type(exc).__name__})",
                         status="connection closed"), ""
        return self._judge(ack, suspect), ack.code

    def _judge(self, ack: AckResult, suspect: bool) -> Verdict:
        status = f"ACK {ack.code}"
        if ack.code in _POSITIVE:
            self._breaker.success()
            return Delivered(status)
        if ack.code in _REJECTED:
            return Retry(status, status=status, fault=self._answered_failure(suspect))
        # AE/CE: the system is up and answering; it refuses this message.
        self._breaker.success()
        return Permanent(status + _error_codes(ack.raw), status=status)

    async def _ack_for(self, reader: asyncio.StreamReader, control_id: str) -> AckResult:
        """The first ACK whose MSA-2 is ours; ACKs for other control ids are passed over."""
        while True:
            ack = parse_ack(await self._next_frame(reader))
            if not ack.code and not ack.control_id:
                raise _MalformedAck
            if ack.control_id != control_id:
                log.debug("backend %s: passed over an ACK for another control id", self.name)
                continue
            if ack.code not in _KNOWN:
                raise _MalformedAck
            return ack

    async def _next_frame(self, reader: asyncio.StreamReader) -> bytes:
        while not self._frames:
            data = await reader.read(65536)
            if not data:
                raise ConnectionResetError("the peer closed the connection")
            for item in self._decoder.feed(data):
                if isinstance(item, FrameTooLarge):
                    raise _MalformedAck
                self._frames.append(item)
        return self._frames.popleft()

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = self._reader, self._writer
        if (reader is not None and writer is not None and not writer.is_closing()
                and not reader.at_eof()):
            return reader, writer
        self._drop_connection()
        opened = await asyncio.wait_for(
            asyncio.open_connection(self.spec.host, self.spec.port, ssl=self.spec.ssl_context,
                                    limit=MAX_ACK_BYTES),
            self.spec.connect_timeout)
        self._reader, self._writer = opened
        self._decoder = FrameDecoder(MAX_ACK_BYTES)
        self._frames.clear()
        self.connections += 1
        log.debug("backend %s: connected to %s:%d", self.name, self.spec.host, self.spec.port)
        return opened

    def _answered_failure(self, suspect: bool) -> Fault:
        """An AR/CR or an unreadable ACK: the system is up and refuses the message for
        now. Evidence against the system the first time a message gets it; from a message
        that has been failing, only against the message (the breaker is told nothing and
        a half-open probe slot is freed), so one poison message cannot keep the breaker
        open for every other."""
        if suspect:
            self._breaker.release()
            return "message"
        self._breaker.failure()
        return "backend"

    def _fail_and_disconnect(self) -> None:
        self._breaker.failure()
        self._drop_connection()

    def _drop_connection(self) -> None:
        writer = self._writer
        self._reader = self._writer = None
        self._frames.clear()
        if writer is not None:
            writer.close()  # closing is enough: nothing more is read from or sent on it

    def _breaker_changed(self, old: str, new: str) -> None:
        log.warning("backend %s: circuit breaker %s -> %s", self.name, old, new)

    async def close(self) -> None:
        writer = self._writer
        self._drop_connection()
        if writer is not None:
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass


def _record(span: trace.Span, verdict: Verdict, ack_code: str) -> None:
    attributes: dict[str, AttributeValue] = {"forward.verdict": _verdict_name(verdict)}
    if ack_code:
        attributes["hl7.ack_code"] = ack_code
    if isinstance(verdict, Retry) and verdict.after is not None:
        attributes["forward.retry_after"] = verdict.after
    set_attributes(span, attributes)
    if not isinstance(verdict, Delivered):
        span.set_status(trace.Status(trace.StatusCode.ERROR, verdict.reason))


def _verdict_name(verdict: Verdict) -> str:
    if isinstance(verdict, Delivered):
        return "delivered"
    return "retry" if isinstance(verdict, Retry) else "permanent"


def _error_codes(raw: bytes) -> str:
    """ERR-3 (error code) and ERR-4 (severity) identifiers of an AE, when present: codes
    only, never the text that may come with them."""
    try:
        ack = parse_message(raw)
    except Hl7Error:
        return ""
    parts = []
    for path, name in (("ERR-3.1", "ERR-3"), ("ERR-4.1", "ERR-4")):
        value = ack.get(path)
        if value and _CODE.fullmatch(value):
            parts.append(f"{name} {value}")
    return f" ({', '.join(parts)})" if parts else ""
