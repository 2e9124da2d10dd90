"""Turn one MLLP frame into a durable inbox row and the acknowledgement to send back.

The order is the durability contract: parse and check, build the ACK, commit message and
ACK together, and only then release the ACK to the connection. A store failure answers AR
("resend later"); a duplicate answers the ACK stored with the original. A different message
under a control id the sender already used (same MSH-3/4/10, other content) is kept as a
`conflict` row, not processed, and answered AE/CE naming MSH-10: never the first one's AA.

Every message answered is also an access to PHI and gets an audit record. The record is
committed beside the inbox row (another file, its own group commit, at the same time) and
the ACK waits for both: a message whose access could not be recorded gets AR, never AA.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from gateway.audit.hl7v2 import message_access, outcome
from gateway.audit.log import AuditLog
from gateway.canonical import Translation
from gateway.fhir.bundle import dumps, to_bundle
from gateway.forward.backend import OutboxGate
from gateway.forward.routes import Router, Targets
from gateway.hl7.ack import (
    APPLICATION_ERROR,
    COMMIT_ERROR,
    ack_code,
    should_send_accept_ack,
)
from gateway.hl7.errors import ErrorCode, Hl7Error, Location
from gateway.hl7.message import (
    Header,
    Message,
    check_header,
    content_digest,
    parse_header,
    parse_message,
    salvage_header,
)
from gateway.hl7.mllp import FrameTooLarge
from gateway.ingest.answer import Answers, audit_failed, where
from gateway.ingest.applier import Outcome
from gateway.ingest.prepare import (
    Budget,
    Inspected,
    Lanes,
    Prepared,
    Request,
    Translators,
    check_content,
    error_from_wire,
    from_wire,
    inspect,
)
from gateway.ingest.protocol import Peer, Push, Reply, SenderCheck, frame_charge
from gateway.ingest.replay import Replay, patient_key, translate
from gateway.mapping.engine import Translator
from gateway.store.errors import StoreUnavailable
from gateway.store.inbox import (
    ACCEPTED,
    FAILED,
    ROUTED,
    TRANSLATED,
    UNSUPPORTED,
    InboundMessage,
    Inbox,
    Stored,
)
from gateway.store.refusals_sqlite import Refusal
from gateway.telemetry import Telemetry, set_attributes, traceparent

log = logging.getLogger(__name__)

# Hands a committed translation on to be applied (the local FHIR store's applier).
# (None: made again from the inbox row when its turn comes.)
Applied = Callable[[int, Translation | None, Outcome | None], None]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class IngestOptions:
    """How messages are checked and read: the `mllp` and `mapping` settings that apply."""

    # "header", "standard" or "strict" (gateway.hl7.validate).
    validation: str = "standard"
    # For a message whose MSH-18 names no character set.
    default_charset: str = "utf-8"
    # Validate every translation with the R4 models (slow; for new tables).
    strict: bool = False
    # With mTLS: whether a certificate subject may send as a message's MSH-3/MSH-4.
    sender_check: SenderCheck | None = None
    # Bytes of frames held between receipt and commit (processes.memory_budget_bytes;
    # a whole frame counts twice: `frame_charge`); None: no bound beyond the listener's.
    budget_bytes: int | None = None
    # Frames this long or longer are parsed, checked and translated on a thread
    # (processes.offload_bytes); None: never.
    offload_bytes: int | None = None
    # Every row keeps its patient key (PostgreSQL: for the apply turns, store/pg/turns.py).
    patient_keys: bool = False
    clock: Callable[[], datetime] = _now


@dataclass(frozen=True, slots=True)
class Routing:
    """Where each message goes, and the outbox that holds what goes to remote backends."""

    router: Router
    outbox: OutboxGate | None = None


class Ingest:
    """The MLLP message handler: frame in, future ACK bytes out (None: send nothing).

    Without `translator` messages are stored only; without `routing` a translation goes to
    the local store only, handed to `applied` once committed."""

    def __init__(self, inbox: Inbox, telemetry: Telemetry,
                 options: IngestOptions | None = None, *,
                 translator: Translator | None = None, applied: Applied | None = None,
                 routing: Routing | None = None, audit: AuditLog | None = None,
                 refused: Callable[[Refusal], None] | None = None,
                 translators: Translators | None = None,
                 large: Executor | None = None) -> None:
        self._inbox = inbox
        self._options = options or IngestOptions()
        self._translator = translator
        self._applied = applied
        self._routing = routing
        self._audit = audit
        self._clock = self._options.clock
        # `refused` hears of each refusal (AR/AE before storage), for the operator's view.
        self._answers = Answers(telemetry, audit, self._clock, refused)
        self._metrics = telemetry.ingest
        # Where translations run when not here; each connection's commits stay in order.
        self._translators = translators
        self._lanes = Lanes()
        budget = self._options.budget_bytes
        self.budget = Budget(budget) if budget is not None else None
        # Where large frames are inspected (a process of their own; see prepare.inspect).
        self._large = large

    def handle(self, frame: bytes | FrameTooLarge, peer: Peer,
               push: Push | None = None) -> asyncio.Future[Reply]:
        """Start handling one frame; the future resolves to the bytes to send back.

        `push` sends a later, unsolicited message on the same connection: the enhanced-mode
        application ACK, once the outcome of processing is known.
        """
        reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        span = self._answers.span("mllp.message")
        started = self._metrics.clock()
        if self._metrics.enabled:
            reply.add_done_callback(lambda _: self._metrics.since("total", started))
        size = frame_charge(len(frame)) if isinstance(frame, bytes) else 0
        if self.budget is not None and isinstance(frame, bytes):
            if not self.budget.take(size):
                # Over the memory budget: refused unread; the sender keeps it and resends.
                error = Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                                 "the gateway holds too many messages; resend later",
                                 reject=True)
                self._answers.refuse(span, reply, salvage_header(frame), [error], peer)
                return reply
            budget = self.budget
            reply.add_done_callback(lambda _: budget.give_back(size))
        try:
            self._handle(frame, peer, span, reply, push)
        except Exception as exc:
            # A bug must cost one message an AR, never the connection or the process. The
            # exception text may quote message content, so only its type and place are logged.
            log.error("internal error on an MLLP message: %s at %s", type(exc).__name__,
                      where(exc))
            if not reply.done():
                error = Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                                 "internal error; the message was not accepted", reject=True)
                self._answers.refuse(span, reply, salvage_header(
                    frame.head if isinstance(frame, FrameTooLarge) else frame), [error], peer)
        return reply

    def _handle(self, frame: bytes | FrameTooLarge, peer: Peer, span: trace.Span,
                reply: asyncio.Future[Reply], push: Push | None = None, *,
                here: bool = False) -> None:
        """`here`: everything on this thread, now (the large-frame process failed)."""
        if isinstance(frame, FrameTooLarge):
            self._answers.refuse_oversize(frame, span, reply, peer)
            return
        set_attributes(span, {"mllp.frame_bytes": len(frame)})
        offload = self._options.offload_bytes
        if (not here and self._large is not None and offload is not None
                and len(frame) >= offload):
            self._handle_large(frame, peer, span, reply, push)
            return
        try:
            message = self._parse(frame, span)
        except Hl7Error as error:
            self._answers.refuse(span, reply, salvage_header(frame), [error], peer)
            return
        try:
            check_header(message.header)
        except Hl7Error as error:
            self._answers.refuse(span, reply, message, [error], peer)
            return
        header = message.header
        self._describe(span, header)
        errors = self._check(message, peer)
        if errors:
            self._answers.refuse(span, reply, message, errors, peer)
            return
        self._store(message, frame, peer, span, reply, push, here=here)

    def _handle_large(self, frame: bytes, peer: Peer, span: trace.Span,
                      reply: asyncio.Future[Reply], push: Push | None) -> None:
        """What costs in proportion to the frame's size (parse, validation, translation,
        digest) in another process; the commit back here, in the connection's order."""
        now = self._clock()
        options = self._options
        ready = asyncio.get_running_loop().run_in_executor(
            self._large, inspect, frame, options.default_charset, options.validation,
            self._translator is not None,
            self._routing.router if self._routing is not None else None, now, options.strict)
        started = self._metrics.clock()

        def step(outcome: Inspected | BaseException | None) -> None:
            if not isinstance(outcome, Inspected):
                # The large-frame process failed: this frame is done here (slowly).
                log.warning("large-frame process failed (%s); handling the frame here",
                            type(outcome).__name__)
                self._handle(frame, peer, span, reply, push, here=True)
                return
            self._metrics.since("translate", started)
            errors = [error_from_wire(e) for e in outcome.errors]
            accepted = not errors and outcome.prepared is not None
            try:
                # Accepted: only MSH is read here (the child read the body). Refused (rare):
                # all of it, for the refusal's audit record.
                message = (parse_header if accepted else parse_message)(
                    frame, options.default_charset)
                header = message.header
            except Hl7Error as error:
                self._answers.refuse(span, reply, salvage_header(frame), errors or [error],
                                     peer)
                return
            self._describe(span, header)
            errors = errors or self._sender_refused(message, peer)
            if errors or outcome.prepared is None:
                if accepted:  # the sender check refused it: the record names the patient
                    message = parse_message(frame, options.default_charset)
                self._answers.refuse(span, reply, message, errors, peer)
                return
            self._commit(message, frame, peer, span, reply, push, now, self._route(header),
                         self._noted(from_wire(outcome.prepared), span), outcome)

        self._lanes.then(peer, ready, self._guarded(step, reply, span, frame, peer))

    def _guarded(self, step: Callable[[Any], None], reply: asyncio.Future[Reply],
                 span: trace.Span, frame: bytes, peer: Peer) -> Callable[[Any], None]:
        """`step`, where a bug costs this message an AR (as in handle()), never more."""
        def guarded(outcome: Any) -> None:
            try:
                step(outcome)
            except Exception as exc:
                log.error("internal error on an MLLP message: %s at %s",
                          type(exc).__name__, where(exc))
                if not reply.done():
                    error = Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                                     "internal error; the message was not accepted",
                                     reject=True)
                    self._answers.refuse(span, reply, salvage_header(frame), [error], peer)
        return guarded

    def _describe(self, span: trace.Span, header: Header) -> None:
        if self._answers.recording:
            set_attributes(span, {
                "hl7.message_type": header.message_type,
                "hl7.control_id": header.control_id,
                "hl7.version": header.version,
                "hl7.sending_application": header.sending_application,
                "hl7.sending_facility": header.sending_facility,
                "hl7.enhanced_mode": header.enhanced_mode,
            })

    # -- steps --------------------------------------------------------------------------

    def _parse(self, frame: bytes, span: trace.Span) -> Message:
        child = self._answers.span("hl7.parse", span)
        started = self._metrics.clock()
        try:
            message = parse_message(frame, self._options.default_charset)
            message.header  # noqa: B018 - reading MSH is part of the parse step
            return message
        finally:
            child.end()
            self._metrics.since("parse", started)

    def _check(self, message: Message, peer: Peer) -> list[Hl7Error]:
        return self._sender_refused(message, peer) or check_content(
            message, self._options.validation)

    def _sender_refused(self, message: Message, peer: Peer) -> list[Hl7Error]:
        sender_check = self._options.sender_check
        if sender_check is not None and not sender_check(peer, message.header):
            return [Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                             "the client certificate may not send as this MSH-3/MSH-4",
                             Location("MSH", 1, 3), reject=True)]
        return []

    def _store(self, message: Message, frame: bytes, peer: Peer, span: trace.Span,
               reply: asyncio.Future[Reply], push: Push | None = None, *,
               here: bool = False) -> None:
        """Translate (here, or by a worker), then commit in the connection's order."""
        now = self._clock()
        routed = self._route(message.header)
        elsewhere = None if here else self._elsewhere(message, frame, routed, now)
        if here or (elsewhere is None and not self._lanes.busy(peer)):
            self._commit(message, frame, peer, span, reply, push, now, routed,
                         self._translate(message, span, now, routed))
            return
        started = self._metrics.clock()

        def step(outcome: Prepared | BaseException | None) -> None:
            if isinstance(outcome, Prepared):
                self._metrics.since("translate", started)
                prepared = self._noted(outcome, span)
            else:  # nothing sent, or the worker went away: translate here
                prepared = self._translate(message, span, now, routed)
            self._commit(message, frame, peer, span, reply, push, now, routed, prepared)

        self._lanes.then(peer, elsewhere, self._guarded(step, reply, span, frame, peer))

    def _elsewhere(self, message: Message, frame: bytes, routed: Targets,
                   now: datetime) -> asyncio.Future[Prepared] | None:
        """The translation handed to a worker or a thread; None: it is done here."""
        if self._translator is None or self._translators is None:
            return None
        return self._translators.translate(Request(
            frame, now, self._options.default_charset,
            patient_key(message), routed.needs_bundle, self._options.strict))

    def _commit(self, message: Message, frame: bytes, peer: Peer, span: trace.Span,
                reply: asyncio.Future[Reply], push: Push | None, now: datetime,
                routed: Targets, translated: Prepared,
                inspected: Inspected | None = None) -> None:
        """Commit the message with its ACK (and audit record); answer once both are
        durable; then hand it on to be applied. `inspected`: a large frame, read in the
        child (`message` is then its MSH only; what is read of the body comes from there)."""
        header = message.header
        status, error = translated.status, translated.error
        targets = routed if translated.translated or self._routing is None else (
            self._routing.router.untranslated(routed))
        outbox = self._routing.outbox if self._routing is not None else None
        if targets.remote and outbox is not None and outbox.full(targets.remote):
            # Accept only what can be held: the sender keeps it and resends later.
            refusal = Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                               "the outbox for this message's backends is full; resend later",
                               reject=True)
            self._answers.refuse(span, reply, message, [refusal], peer)
            return
        if status == TRANSLATED and not targets.local:
            status = ROUTED  # for remote backends only: not for the local store
        # Original mode answers the application outcome: AE names what could not be
        # translated. Enhanced mode's accept ACK answers only the commit (CA); the outcome
        # follows as the application ACK (MSH-16) and stays in the inbox for replay.
        errors = [error] if error is not None and not header.enhanced_mode else []
        code = ack_code(errors, header.enhanced_mode)
        ack = self._answers.ack_text(span, message, header, code, errors, now).encode(
            message.charset)
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
            error=translated.error_text,
            routes=targets.remote,
            patient_key=(inspected.patient_key if inspected is not None else patient_key(
                message) if targets.remote or self._options.patient_keys else ""),
            trace=traceparent(span) if targets.remote else "",
            bundle=translated.bundle if targets.needs_bundle else None,
            content_hash=inspected.digest if inspected is not None else content_digest(
                message),
            conflict_ack=lambda: self._answers.conflict_ack(span, message, now),
            packed=inspected.packed if inspected is not None else None,
        )
        store_span = self._answers.span("inbox.store", span)
        store_started = self._metrics.clock()
        stored = self._inbox.submit(inbound)
        audited = None
        if self._audit is not None:
            audit_span = self._answers.span("audit.append", span)
            record = message_access(
                message, peer=peer.address, tls_subject=peer.tls_subject,
                outcome=outcome(code, int(errors[0].code) if errors else None), time=now,
                trace_id=span.get_span_context().trace_id, detail=_DETAIL.get(status, ""))
            if inspected is not None:
                record = record._replace(patient=inspected.patient)
            audited = self._audit.submit(record)
            if self._answers.recording:
                audited.add_done_callback(lambda _: audit_span.end())

        def committed(done: asyncio.Future[Stored]) -> None:
            try:
                answer(done)
            except Exception as exc:  # the message may be stored: a resend gets its ACK
                log.error("internal error answering a stored MLLP message: %s at %s",
                          type(exc).__name__, where(exc))
                if not reply.done():
                    reply.set_result(None)

        def answer(done: asyncio.Future[Stored]) -> None:
            store_span.end()
            self._metrics.since("store", store_started)
            unrecorded = audited is not None and audit_failed(audited)
            try:
                result = done.result()
            except StoreUnavailable:
                refusal = Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                                   "the message could not be stored; resend later",
                                   reject=True)
                self._answers.refuse(span, reply, message, [refusal], peer)
                return
            if unrecorded:
                # Fail closed: stored, but an unrecorded access is never acknowledged; the
                # resend is answered as a duplicate once the audit trail takes it.
                refusal = Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                                   "the message could not be recorded in the audit trail; "
                                   "resend later", reject=True)
                self._answers.refuse(span, reply, message, [refusal])
                return
            set_attributes(span, {"store.inbox_id": result.inbox_id,
                                  "hl7.duplicate": result.duplicate})
            if result.conflict:
                self._conflicted(span, reply, message, peer, result, len(frame), inspected)
                return
            send = should_send_accept_ack(header.accept_ack_type, code) or (
                not header.enhanced_mode)
            self._answers.finish(span, reply, result.ack if send else None, code, len(frame),
                                 header.message_type)
            if not result.duplicate:
                if targets.remote and outbox is not None:
                    outbox.queued(targets.remote)
                # After the commit ACK is queued, so an application ACK can only follow it.
                self._process(message, status, error, translated, targets.local,
                              result.inbox_id, push if header.enhanced_mode else None)

        if audited is None:
            stored.add_done_callback(committed)
        else:
            _when_both(stored, audited, committed)

    def _conflicted(self, span: trace.Span, reply: asyncio.Future[Reply], message: Message,
                    peer: Peer, result: Stored, size: int,
                    inspected: Inspected | None = None) -> None:
        """Answer a message kept as a control id conflict with its stored AE/CE; nothing
        is processed or delivered until an operator replays it."""
        header = message.header
        code = COMMIT_ERROR if header.enhanced_mode else APPLICATION_ERROR
        if not result.duplicate:
            self._metrics.conflict()
        if self._audit is not None:
            # The record committed with the message was written before the conflict was
            # known (it says accepted); this one says how it was answered, so the trail
            # and the inbox agree. The answer does not wait for it: the access is on record.
            try:
                record = message_access(
                    message, peer=peer.address, tls_subject=peer.tls_subject,
                    outcome=outcome(code, int(ErrorCode.DUPLICATE_KEY)), time=self._clock(),
                    trace_id=span.get_span_context().trace_id, detail="control id conflict")
                if inspected is not None:  # `message` is its MSH only
                    record = record._replace(patient=inspected.patient)
                noted = self._audit.submit(record)
                noted.add_done_callback(audit_failed)
            except Exception as exc:  # the conflict is kept and answered regardless
                log.error("could not record a control id conflict: %s at %s",
                          type(exc).__name__, where(exc))
        # Sender and control id identify a message, not a person (no PHI).
        # Worded without "MSH-": the log redactor reads that as a segment and blanks the
        # rest of the line.
        log.warning("control id conflict: %s/%s sent a different message under control id "
                    "%r within the duplicate window; kept as inbox row %d (status conflict, "
                    "%s), answered %s", header.sending_application, header.sending_facility,
                    header.control_id, result.inbox_id,
                    "a resend" if result.duplicate else "new", code)
        send = should_send_accept_ack(header.accept_ack_type, code) or (
            not header.enhanced_mode)
        self._answers.finish(span, reply, result.ack if send else None, code, size,
                             header.message_type)

    def _route(self, header: Header) -> Targets:
        """Where the message goes if it translates (`Router.untranslated` if not)."""
        if self._routing is None:
            return _LOCAL
        return self._routing.router.for_message(
            header.message_type, header.sending_application, header.sending_facility)

    def _process(self, message: Message, status: str, error: Hl7Error | None,
                 translated: Prepared, local: bool, inbox_id: int,
                 push: Push | None) -> None:
        """After the commit: hand the translation on to be applied; in enhanced mode, send
        the application ACK (MSH-16) once the outcome is known."""
        def outcome(problem: Hl7Error | None) -> None:
            if push is not None:
                self._answers.application_ack(message, problem, push)

        if translated.translated and local and self._applied is not None:
            self._applied(inbox_id, translated.translation,
                          outcome if push is not None else None)
        elif push is not None:
            # Nothing left to do (not translated, not mapped, or no store): the outcome is
            # known now. A message no table maps is accepted, as in original mode.
            outcome(error if status == FAILED else None)

    def _translate(self, message: Message, span: trace.Span, now: datetime,
                   routed: Targets) -> Prepared:
        """Translate before the commit (it is CPU only), so message, ACK and outcome are
        stored together in one write; a failure is stored too, for replay."""
        if self._translator is None:
            return _NOT_TRANSLATED
        translated = self._translate_here(message, span, now)
        translation = translated.translation
        if translation is None:
            return self._noted(Prepared(translated.status, translated.error,
                                        translated.reason), span)
        return self._noted(Prepared(
            TRANSLATED, translation=translation,
            bundle=dumps(to_bundle(translation)) if routed.needs_bundle else None,
            resources=len(translation.resources), unmapped=translation.unmapped_count,
            z_segments=translation.z_segments), span)

    def _translate_here(self, message: Message, span: trace.Span, now: datetime) -> Replay:
        assert self._translator is not None
        child = self._answers.span("mapping.translate", span)
        started = self._metrics.clock()
        try:
            translated = translate(self._translator, message, now,
                                   strict=self._options.strict)
        except Exception as exc:  # a table or engine bug costs this message, not the edge
            log.error("internal error translating an MLLP message: %s at %s",
                      type(exc).__name__, where(exc))
            return Replay(FAILED, error=Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR,
                                                 "internal error while translating"))
        finally:
            child.end()
            self._metrics.since("translate", started)
        translation = translated.translation
        if translation is not None and translation.unmapped and log.isEnabledFor(
                logging.DEBUG):
            # Locations and counts only: never a value.
            log.debug("unmapped in %s: %s", translation.provenance.message_type,
                      ", ".join(f"{k}x{v}" for k, v in sorted(translation.unmapped.items())))
        return translated

    def _noted(self, prepared: Prepared, span: trace.Span) -> Prepared:
        """The translation outcome on the span (and a failure in the log: no value)."""
        if not prepared.translated:
            set_attributes(span, {"mapping.status": prepared.status})
            if prepared.status == FAILED:
                log.info("could not translate an MLLP message: %s", prepared.reason)
        elif self._answers.recording:
            set_attributes(span, {"mapping.status": TRANSLATED,
                                  "mapping.resources": prepared.resources,
                                  "mapping.unmapped": prepared.unmapped,
                                  "mapping.z_segments": prepared.z_segments})
        return prepared


# The translation outcome, as the audit record's note.
_DETAIL = {TRANSLATED: "translated", ROUTED: "translated", FAILED: "translation failed",
           UNSUPPORTED: "not mapped"}
_LOCAL = Targets(local=True)
_NOT_TRANSLATED = Prepared(ACCEPTED)


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

