"""Answering an MLLP message: ACK text, refusals (AE/AR, CE/CR) and their audit records.

Every answer goes out through `finish`, which closes the message's span and counts it;
every refusal through `refuse`, which keeps the refusal in the audit trail first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable
from datetime import datetime

from opentelemetry import trace

from gateway.audit.hl7v2 import message_access, outcome
from gateway.audit.log import AuditLog
from gateway.hl7.ack import (
    APPLICATION_ACCEPT,
    APPLICATION_ERROR,
    APPLICATION_REJECT,
    COMMIT_ERROR,
    COMMIT_REJECT,
    ack_code,
    build_ack,
    should_send_accept_ack,
    should_send_application_ack,
)
from gateway.hl7.definitions import known_anywhere
from gateway.hl7.delimiters import DEFAULT_DELIMITERS, Delimiters
from gateway.hl7.errors import ErrorCode, Hl7Error, Location
from gateway.hl7.message import Header, Message, header_or_none, salvage_header
from gateway.hl7.mllp import FrameTooLarge
from gateway.ingest.protocol import Peer, Push, Reply
from gateway.store.refusals_sqlite import Refusal
from gateway.telemetry import Telemetry, mark_failed, set_attributes

log = logging.getLogger(__name__)


class ControlIds:
    """Control ids for our own ACKs: unique per process start, short, no clock needed."""

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex().upper()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"ISM{self._prefix}{next(self._counter):010d}"


class Answers:
    """Builds and sends the answers to MLLP messages, with their spans and metrics."""

    def __init__(self, telemetry: Telemetry, audit: AuditLog | None,
                 clock: Callable[[], datetime],
                 refused: Callable[[Refusal], None] | None = None) -> None:
        self._refused = refused
        self._tracer = telemetry.tracer
        self.recording = telemetry.recording
        self.metrics = telemetry.ingest
        self._audit = audit
        self._clock = clock
        self._control_ids = ControlIds()

    def span(self, name: str, parent: trace.Span | None = None) -> trace.Span:
        """A span, or the shared non-recording one when nothing exports (no cost at all)."""
        if not self.recording:
            return trace.INVALID_SPAN
        context = trace.set_span_in_context(parent) if parent is not None else None
        return self._tracer.start_span(name, context=context)

    def ack_text(self, span: trace.Span, message: Message | None, header: Header | None,
                 code: str, errors: tuple[Hl7Error, ...] | list[Hl7Error],
                 now: datetime) -> str:
        delimiters: Delimiters = message.delimiters if message is not None else DEFAULT_DELIMITERS
        child = self.span("mllp.ack", span)
        started = self.metrics.clock()
        try:
            return build_ack(header, code, errors, control_id=self._control_ids.next(),
                             now=now, delimiters=delimiters)
        finally:
            child.end()
            self.metrics.since("ack", started)

    def conflict_ack(self, span: trace.Span, message: Message, now: datetime) -> bytes:
        """AE (CE in enhanced mode) for a different message under a control id this sender
        already used: ERR names MSH-10 with table 0357 code 205 (duplicate key)."""
        header = message.header
        code = COMMIT_ERROR if header.enhanced_mode else APPLICATION_ERROR
        return self.ack_text(span, message, header, code, [CONTROL_ID_CONFLICT], now).encode(
            message.charset, "replace")

    def refuse_oversize(self, frame: FrameTooLarge, span: trace.Span,
                        reply: asyncio.Future[Reply], peer: Peer) -> None:
        reason = (f"frame larger than the {frame.limit} byte limit" if frame.scope == "frame"
                  else "the gateway is holding too much unfinished data; resend later")
        error = Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR, reason, reject=True)
        self.refuse(span, reply, salvage_header(frame.head), [error], peer)

    def refuse(self, span: trace.Span, reply: asyncio.Future[Reply],
               message: Message | None, errors: list[Hl7Error],
               peer: Peer | None = None) -> None:
        """Answer AE/AR (CE/CR); with `peer`, once the refusal is in the audit trail."""
        header = header_or_none(message)
        enhanced = header.enhanced_mode if header else False
        code = ack_code(errors, enhanced)
        first = errors[0]
        set_attributes(span, {"hl7.error_code": int(first.code),
                              "hl7.error_location": str(first.location or "")})
        log.info("refused MLLP message: %s %s (%s)", code, first.location or "-",
                 first.code.text)
        text = self.ack_text(span, message, header, code, errors, self._clock())
        charset = message.charset if message is not None else "utf-8"
        send = not enhanced or should_send_accept_ack(
            header.accept_ack_type if header else "", code)
        ack = text.encode(charset, "replace") if send else None
        message_type = header.message_type if header else ""
        if self._refused is not None:
            self._refused(_refusal(header, code, errors, peer, self._clock()))
        if self._audit is None or peer is None:
            self.finish(span, reply, ack, code, 0, message_type)
            return
        try:
            audited = self._audit.submit(message_access(
                message, peer=peer.address, tls_subject=peer.tls_subject,
                outcome=outcome(code, int(first.code)), time=self._clock(),
                trace_id=span.get_span_context().trace_id))
        except Exception as exc:  # the refusal goes out regardless: it grants nothing
            log.error("could not record a refused MLLP message: %s at %s",
                      type(exc).__name__, where(exc))
            self.finish(span, reply, ack, code, 0, message_type)
            return
        # A refusal grants no access, so it goes out even if its record fails (logged by
        # the audit writer); it waits only to keep the record before the answer.
        def recorded(done: asyncio.Future[tuple[int, bytes]]) -> None:
            audit_failed(done)
            self.finish(span, reply, ack, code, 0, message_type)

        audited.add_done_callback(recorded)

    def finish(self, span: trace.Span, reply: asyncio.Future[Reply], ack: Reply, code: str,
               size: int, message_type: str = "") -> None:
        result = "rejected" if code in (APPLICATION_REJECT, COMMIT_REJECT) else code
        set_attributes(span, {"hl7.ack_code": code, "outcome": result})
        if code not in _ACCEPTED:
            mark_failed(span, code or "no-ack")
        self.metrics.message(metric_type(message_type), code, size)
        span.end()
        if not reply.done():
            reply.set_result(ack)

    def application_ack(self, message: Message, problem: Hl7Error | None,
                        push: Push) -> None:
        """Send the enhanced-mode application ACK (MSH-16) for a known outcome."""
        header = message.header
        code = APPLICATION_ERROR if problem is not None else APPLICATION_ACCEPT
        if not should_send_application_ack(header.application_ack_type, code):
            return
        errors = [problem] if problem is not None else []
        try:
            text = build_ack(header, code, errors, control_id=self._control_ids.next(),
                             now=self._clock(), delimiters=message.delimiters)
            push(text.encode(message.charset))
        except Exception as exc:  # the outcome stays in the inbox; the ACK is a courtesy
            log.error("could not send an application ACK: %s", type(exc).__name__)


# The ERR of a control id conflict: the message was kept (for review), not processed.
CONTROL_ID_CONFLICT = Hl7Error(
    ErrorCode.DUPLICATE_KEY,
    "this control id was already used for a different message from this sender; the "
    "message is kept for review and was not processed: send it under a new control id",
    Location("MSH", 1, 10))


def audit_failed(future: asyncio.Future[tuple[int, bytes]]) -> bool:
    """Whether an audit append failed (and its exception is taken, so it is not logged)."""
    return future.cancelled() or future.exception() is not None


def where(exc: BaseException) -> str:
    """file:line where an exception was raised, for logs that must not quote its text."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"


def _refusal(header: Header | None, code: str, errors: list[Hl7Error], peer: Peer | None,
             now: datetime) -> Refusal:
    """What the operator may see of a refusal: who, which message, which rules; no values."""
    return Refusal(
        refused_at=now.isoformat(timespec="milliseconds"),
        peer=peer.address if peer is not None else "",
        sending_application=header.sending_application if header else "",
        sending_facility=header.sending_facility if header else "",
        control_id=header.control_id if header else "",
        message_type=header.message_type if header else "",
        ack_code=code,
        errors=tuple((int(e.code), str(e.location or "")) for e in errors))


_INVENTED = "_other"
_ACCEPTED = frozenset({"AA", "CA"})


def metric_type(message_type: str) -> str:
    """MSH-9 as a metric label may carry it: HL7's own message codes and events (of any
    version) only. Anything a sender invents (QQQ^Q01) is one `_other` series, so senders
    cannot grow the label set; an invented structure (third component) is dropped."""
    code, _, rest = message_type.partition("^")
    event, _, structure = rest.partition("^")
    if not code:
        return ""
    known = known_anywhere()
    if code not in known.message_codes or (event and event not in known.trigger_events):
        return _INVENTED
    label = f"{code}^{event}" if event else code
    if structure and structure.partition("_")[0] in known.message_codes:
        label += f"^{structure}"
    return label

