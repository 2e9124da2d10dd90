"""Turn one MLLP frame into a durable inbox row and the acknowledgement to send back.

The order is the durability contract: parse and check, build the ACK, commit message and
ACK together, and only then release the ACK to the connection. A store failure answers AR
("resend later"); a duplicate answers the ACK stored with the original.

Every message answered is also an access to PHI and gets an audit record. The record is
committed beside the inbox row (another file, its own group commit, at the same time) and
the ACK waits for both: a message whose access could not be recorded gets AR, never AA.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from opentelemetry import trace

from gateway.audit import AuditLog
from gateway.audit.hl7v2 import message_access, outcome
from gateway.canonical import Translation
from gateway.fhir.bundle import dumps, to_bundle
from gateway.fhir.validate import InvalidResource, validate_resource
from gateway.forward.backend import OutboxGate
from gateway.forward.routes import Router, Targets
from gateway.hl7.ack import (
    APPLICATION_ACCEPT,
    APPLICATION_ERROR,
    APPLICATION_REJECT,
    COMMIT_REJECT,
    ack_code,
    build_ack,
    should_send_accept_ack,
    should_send_application_ack,
)
from gateway.hl7.delimiters import DEFAULT_DELIMITERS, Delimiters
from gateway.hl7.errors import ErrorCode, Hl7Error, Location
from gateway.hl7.message import (
    Header,
    Message,
    check_header,
    header_or_none,
    parse_message,
    salvage_header,
)
from gateway.hl7.mllp import FrameTooLarge
from gateway.hl7.validate import validate
from gateway.mapping.engine import Translator
from gateway.mapping.errors import TranslationError, UnsupportedMessage
from gateway.store import InboundMessage, SqliteInbox, Stored, StoreUnavailable
from gateway.store.inbox import ACCEPTED, FAILED, ROUTED, TRANSLATED, UNSUPPORTED
from gateway.telemetry import Telemetry, set_attributes

log = logging.getLogger(__name__)

Reply = bytes | None
# Sends an unsolicited frame on the connection a message came in on (if still open).
Push = Callable[[bytes], None]
# Called when a translated message has been applied: None, or the problem (enhanced mode).
Outcome = Callable[["Hl7Error | None"], None]
# Hands a committed translation on to be applied (the local FHIR store's applier).
Applied = Callable[[int, Translation, "Outcome | None"], None]


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection: address and, with mTLS, the subject."""

    address: str
    tls_subject: str | None = None


# Decides whether a (verified) certificate subject may send as this MSH-3/MSH-4.
SenderCheck = Callable[[Peer, Header], bool]


class ControlIds:
    """Control ids for our own ACKs: unique per process start, short, no clock needed."""

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex().upper()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"ISM{self._prefix}{next(self._counter):010d}"


class Ingest:
    """The MLLP message handler: frame in, future ACK bytes out (None: send nothing)."""

    def __init__(
        self,
        inbox: SqliteInbox,
        telemetry: Telemetry,
        *,
        validation: str = "standard",
        default_charset: str = "utf-8",
        sender_check: SenderCheck | None = None,
        translator: Translator | None = None,
        strict: bool = False,
        audit: AuditLog | None = None,
        applied: Applied | None = None,
        router: Router | None = None,
        outbox: OutboxGate | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._inbox = inbox
        # Where each message goes (no router: the local store only) and the outbox that
        # holds what goes to remote backends.
        self._router = router
        self._outbox = outbox
        # Handed each newly committed translation (the local FHIR store's applier).
        self._applied = applied
        self._audit = audit
        self._tracer = telemetry.tracer
        self._recording = telemetry.recording
        self._validation = validation
        self._default_charset = default_charset
        self._sender_check = sender_check
        self._translator = translator
        self._strict = strict
        self._clock = clock
        self._control_ids = ControlIds()
        self._metrics = telemetry.ingest

    def handle(self, frame: bytes | FrameTooLarge, peer: Peer,
               push: Push | None = None) -> asyncio.Future[Reply]:
        """Start handling one frame; the future resolves to the bytes to send back.

        `push` sends a later, unsolicited message on the same connection: the enhanced-mode
        application ACK, once the outcome of processing is known.
        """
        reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        span = self._span("mllp.message")
        started = self._metrics.clock()
        if self._metrics.enabled:
            reply.add_done_callback(lambda _: self._metrics.since("total", started))
        try:
            self._handle(frame, peer, span, reply, push)
        except Exception as exc:
            # A bug must cost one message an AR, never the connection or the process. The
            # exception text may quote message content, so only its type and place are logged.
            log.error("internal error on an MLLP message: %s at %s", type(exc).__name__,
                      _where(exc))
            if not reply.done():
                error = Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                                 "internal error; the message was not accepted", reject=True)
                self._answer_errors(span, reply, salvage_header(
                    frame.head if isinstance(frame, FrameTooLarge) else frame), [error], peer)
        return reply

    def _handle(self, frame: bytes | FrameTooLarge, peer: Peer, span: trace.Span,
                reply: asyncio.Future[Reply], push: Push | None = None) -> None:
        if isinstance(frame, FrameTooLarge):
            self._refuse_oversize(frame, span, reply, peer)
            return
        set_attributes(span, {"mllp.frame_bytes": len(frame)})
        try:
            message = self._parse(frame, span)
        except Hl7Error as error:
            self._answer_errors(span, reply, salvage_header(frame), [error], peer)
            return
        try:
            check_header(message.header)
        except Hl7Error as error:
            self._answer_errors(span, reply, message, [error], peer)
            return
        header = message.header
        if self._recording:
            set_attributes(span, {
                "hl7.message_type": header.message_type,
                "hl7.control_id": header.control_id,
                "hl7.version": header.version,
                "hl7.sending_application": header.sending_application,
                "hl7.sending_facility": header.sending_facility,
                "hl7.enhanced_mode": header.enhanced_mode,
            })
        errors = self._check(message, peer)
        if errors:
            self._answer_errors(span, reply, message, errors, peer)
            return
        self._store(message, frame, peer, span, reply, push)

    # -- steps --------------------------------------------------------------------------

    def _span(self, name: str, parent: trace.Span | None = None) -> trace.Span:
        """A span, or the shared non-recording one when nothing exports (no cost at all)."""
        if not self._recording:
            return trace.INVALID_SPAN
        context = trace.set_span_in_context(parent) if parent is not None else None
        return self._tracer.start_span(name, context=context)

    def _parse(self, frame: bytes, span: trace.Span) -> Message:
        child = self._span("hl7.parse", span)
        started = self._metrics.clock()
        try:
            message = parse_message(frame, self._default_charset)
            message.header  # noqa: B018 - reading MSH is part of the parse step
            return message
        finally:
            child.end()
            self._metrics.since("parse", started)

    def _check(self, message: Message, peer: Peer) -> list[Hl7Error]:
        header = message.header
        if self._sender_check is not None and not self._sender_check(peer, header):
            return [Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                             "the client certificate may not send as this MSH-3/MSH-4",
                             Location("MSH", 1, 3), reject=True)]
        if _holds_several_messages(message):
            return [Hl7Error(ErrorCode.SEGMENT_SEQUENCE_ERROR,
                             "one MLLP frame must carry exactly one message",
                             Location("MSH", 2), reject=True)]
        return validate(message, self._validation)

    def _store(self, message: Message, frame: bytes, peer: Peer, span: trace.Span,
               reply: asyncio.Future[Reply], push: Push | None = None) -> None:
        header = message.header
        now = self._clock()
        status, error, translation = self._translate(message, span, now)
        targets = self._targets(header, translation)
        if targets.remote and self._outbox is not None and self._outbox.full(targets.remote):
            # Accept only what can be held: the sender keeps it and resends later.
            refusal = Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                               "the outbox for this message's backends is full; resend later",
                               reject=True)
            self._answer_errors(span, reply, message, [refusal], peer)
            return
        if status == TRANSLATED and not targets.local:
            status = ROUTED  # for remote backends only: not for the local store
        # Original mode answers the application outcome: AE names what could not be
        # translated. Enhanced mode's accept ACK answers only the commit (CA); the outcome
        # follows as the application ACK (MSH-16) and stays in the inbox for replay.
        errors = [error] if error is not None and not header.enhanced_mode else []
        code = ack_code(errors, header.enhanced_mode)
        ack = self._ack_text(span, message, header, code, errors, now).encode(message.charset)
        inbound = InboundMessage(
            sending_application=header.sending_application,
            sending_facility=header.sending_facility,
            control_id=header.control_id,
            message_type=header.message_type,
            version=header.version,
            peer=peer.address,
            raw=frame,
            ack=ack,
            received_at=now,
            status=status,
            error=error.reason if error is not None else "",
            routes=targets.remote,
            patient_key=patient_key(message) if targets.remote else "",
            trace=_traceparent(span) if targets.remote else "",
            bundle=(dumps(to_bundle(translation))
                    if targets.needs_bundle and translation is not None else None),
        )
        store_span = self._span("inbox.store", span)
        store_started = self._metrics.clock()
        stored = self._inbox.submit(inbound)
        audited = None
        if self._audit is not None:
            audit_span = self._span("audit.append", span)
            audited = self._audit.submit(message_access(
                message, peer=peer.address, tls_subject=peer.tls_subject,
                outcome=outcome(code, int(errors[0].code) if errors else None), time=now,
                trace_id=span.get_span_context().trace_id, detail=_DETAIL.get(status, "")))
            if self._recording:
                audited.add_done_callback(lambda _: audit_span.end())

        def committed(done: asyncio.Future[Stored]) -> None:
            try:
                answer(done)
            except Exception as exc:  # the message may be stored: a resend gets its ACK
                log.error("internal error answering a stored MLLP message: %s at %s",
                          type(exc).__name__, _where(exc))
                if not reply.done():
                    reply.set_result(None)

        def answer(done: asyncio.Future[Stored]) -> None:
            store_span.end()
            self._metrics.since("store", store_started)
            unrecorded = audited is not None and _failed(audited)
            try:
                result = done.result()
            except StoreUnavailable:
                refusal = Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                                   "the message could not be stored; resend later",
                                   reject=True)
                self._answer_errors(span, reply, message, [refusal], peer)
                return
            if unrecorded:
                # Fail closed: stored, but an unrecorded access is never acknowledged; the
                # resend is answered as a duplicate once the audit trail takes it.
                refusal = Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                                   "the message could not be recorded in the audit trail; "
                                   "resend later", reject=True)
                self._answer_errors(span, reply, message, [refusal])
                return
            set_attributes(span, {"store.inbox_id": result.inbox_id,
                                  "hl7.duplicate": result.duplicate})
            send = should_send_accept_ack(header.accept_ack_type, code) or (
                not header.enhanced_mode)
            self._finish(span, reply, result.ack if send else None, code, len(frame),
                         header.message_type)
            if not result.duplicate:
                if targets.remote and self._outbox is not None:
                    self._outbox.queued(targets.remote)
                # After the commit ACK is queued, so an application ACK can only follow it.
                self._process(message, status, error,
                              translation if targets.local else None, result.inbox_id,
                              push if header.enhanced_mode else None)

        if audited is None:
            stored.add_done_callback(committed)
        else:
            _when_both(stored, audited, committed)

    def _targets(self, header: Header, translation: Translation | None) -> Targets:
        if self._router is None:
            return _LOCAL
        targets = self._router.for_message(header.message_type, header.sending_application,
                                           header.sending_facility)
        return targets if translation is not None else self._router.untranslated(targets)

    def _process(self, message: Message, status: str, error: Hl7Error | None,
                 translation: Translation | None, inbox_id: int, push: Push | None) -> None:
        """After the commit: hand the translation on to be applied; in enhanced mode, send
        the application ACK (MSH-16) once the outcome is known."""
        def outcome(problem: Hl7Error | None) -> None:
            if push is not None:
                self._send_application_ack(message, problem, push)

        if translation is not None and self._applied is not None:
            self._applied(inbox_id, translation, outcome if push is not None else None)
        elif push is not None:
            # Nothing left to do (not translated, not mapped, or no store): the outcome is
            # known now. A message no table maps is accepted, as in original mode.
            outcome(error if status == FAILED else None)

    def _send_application_ack(self, message: Message, problem: Hl7Error | None,
                              push: Push) -> None:
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

    def _translate(self, message: Message, span: trace.Span,
                   now: datetime) -> tuple[str, Hl7Error | None, Translation | None]:
        """Translate before the commit (it is CPU only), so message, ACK and outcome are
        stored together in one write; a failure is stored too, for replay."""
        if self._translator is None:
            return ACCEPTED, None, None
        child = self._span("mapping.translate", span)
        started = self._metrics.clock()
        try:
            translation = self._translator.translate(message, now)
            if self._strict:
                check_bundle(translation)
        except UnsupportedMessage:
            set_attributes(span, {"mapping.status": UNSUPPORTED})
            return UNSUPPORTED, None, None
        except TranslationError as exc:
            set_attributes(span, {"mapping.status": FAILED})
            log.info("could not translate an MLLP message: %s", exc.safe_text)
            return FAILED, translation_error(exc), None
        except Exception as exc:  # a table or engine bug costs this message, not the edge
            log.error("internal error translating an MLLP message: %s at %s",
                      type(exc).__name__, _where(exc))
            return FAILED, Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                                    "internal error while translating"), None
        finally:
            child.end()
            self._metrics.since("translate", started)
        if self._recording:
            set_attributes(span, {"mapping.status": TRANSLATED,
                                  "mapping.resources": len(translation.resources),
                                  "mapping.unmapped": translation.unmapped_count,
                                  "mapping.z_segments": translation.z_segments})
        if translation.unmapped and log.isEnabledFor(logging.DEBUG):
            # Locations and counts only: never a value.
            log.debug("unmapped in %s: %s", translation.provenance.message_type,
                      ", ".join(f"{k}x{v}" for k, v in sorted(translation.unmapped.items())))
        return TRANSLATED, None, translation

    def _refuse_oversize(self, frame: FrameTooLarge, span: trace.Span,
                         reply: asyncio.Future[Reply], peer: Peer) -> None:
        reason = (f"frame larger than the {frame.limit} byte limit" if frame.scope == "frame"
                  else "the gateway is holding too much unfinished data; resend later")
        error = Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR, reason, reject=True)
        self._answer_errors(span, reply, salvage_header(frame.head), [error], peer)

    def _answer_errors(self, span: trace.Span, reply: asyncio.Future[Reply],
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
        text = self._ack_text(span, message, header, code, errors, self._clock())
        charset = message.charset if message is not None else "utf-8"
        send = not enhanced or should_send_accept_ack(
            header.accept_ack_type if header else "", code)
        ack = text.encode(charset, "replace") if send else None
        message_type = header.message_type if header else ""
        if self._audit is None or peer is None:
            self._finish(span, reply, ack, code, 0, message_type)
            return
        try:
            audited = self._audit.submit(message_access(
                message, peer=peer.address, tls_subject=peer.tls_subject,
                outcome=outcome(code, int(first.code)), time=self._clock(),
                trace_id=span.get_span_context().trace_id))
        except Exception as exc:  # the refusal goes out regardless: it grants nothing
            log.error("could not record a refused MLLP message: %s at %s",
                      type(exc).__name__, _where(exc))
            self._finish(span, reply, ack, code, 0, message_type)
            return
        # A refusal grants no access, so it goes out even if its record fails (logged by
        # the audit writer); it waits only to keep the record before the answer.
        def recorded(done: asyncio.Future[tuple[int, bytes]]) -> None:
            _failed(done)
            self._finish(span, reply, ack, code, 0, message_type)

        audited.add_done_callback(recorded)

    def _ack_text(self, span: trace.Span, message: Message | None, header: Header | None,
                  code: str, errors: tuple[Hl7Error, ...] | list[Hl7Error],
                  now: datetime) -> str:
        delimiters: Delimiters = message.delimiters if message is not None else DEFAULT_DELIMITERS
        child = self._span("mllp.ack", span)
        started = self._metrics.clock()
        try:
            return build_ack(header, code, errors, control_id=self._control_ids.next(),
                             now=now, delimiters=delimiters)
        finally:
            child.end()
            self._metrics.since("ack", started)

    def _finish(self, span: trace.Span, reply: asyncio.Future[Reply], ack: Reply, code: str,
                size: int, message_type: str = "") -> None:
        outcome = "rejected" if code in (APPLICATION_REJECT, COMMIT_REJECT) else code
        set_attributes(span, {"hl7.ack_code": code, "outcome": outcome})
        self._metrics.message(message_type, code, size)
        span.end()
        if not reply.done():
            reply.set_result(ack)


# The translation outcome, as the audit record's note.
_DETAIL = {TRANSLATED: "translated", ROUTED: "translated", FAILED: "translation failed",
           UNSUPPORTED: "not mapped"}
_LOCAL = Targets(local=True)


def patient_key(message: Message) -> str:
    """Orders one patient's deliveries: a hash of PID-3's first identifier and its
    assigning authority (the outbox keeps this, never the identifier). '' if none."""
    identifier = message.get("PID-3.1")
    if not identifier:
        return ""
    authority = message.get_raw("PID-3(1).4")
    return hashlib.sha256(f"{authority}\x1f{identifier}".encode()).hexdigest()[:32]


def _traceparent(span: trace.Span) -> str:
    """The span as a W3C traceparent, for the delivery spans to hang under; '' untraced."""
    context = span.get_span_context()
    if not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def _failed(future: asyncio.Future[tuple[int, bytes]]) -> bool:
    """Whether an audit append failed (and its exception is taken, so it is not logged)."""
    return future.cancelled() or future.exception() is not None


def _when_both(stored: asyncio.Future[Stored], audited: asyncio.Future[tuple[int, bytes]],
               then: Callable[[asyncio.Future[Stored]], None]) -> None:
    """Call `then(stored)` once the inbox commit and the audit commit have both finished."""
    remaining = [2]

    def one_done(_: object) -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            then(stored)

    stored.add_done_callback(one_done)
    audited.add_done_callback(one_done)


def _where(exc: BaseException) -> str:
    """file:line where an exception was raised, for logs that must not quote its text."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"


def _holds_several_messages(message: Message) -> bool:
    """A second MSH at the start of a line: a batch or two messages in one frame."""
    text = message.to_text()
    return "\rMSH" in text or "\nMSH" in text


def translation_error(exc: TranslationError) -> Hl7Error:
    """The ERR for a message that could not be translated: where, and why (no value)."""
    code = ErrorCode.DATA_TYPE_ERROR if exc.value is not None else (
        ErrorCode.APPLICATION_INTERNAL_ERROR)
    return Hl7Error(code, exc.safe_text, _location(exc))


def _location(exc: TranslationError) -> Location | None:
    segment, _, rest = exc.location.partition("-")
    numbers = [int(n) for n in rest.split(".") if n.isdigit()]
    if len(segment) != 3 or not numbers:
        return None
    return Location(segment, exc.sequence, numbers[0],
                    numbers[1] if len(numbers) > 1 else None,
                    subcomponent=numbers[2] if len(numbers) > 2 else None)


def check_bundle(translation: Translation) -> None:
    """Strict mode: validate the whole output with the R4 models (slow; for new tables)."""
    try:
        validate_resource(orjson.loads(dumps(to_bundle(translation))))
    except InvalidResource as exc:
        raise TranslationError("", f"the output is not valid FHIR R4 ({exc})") from None
