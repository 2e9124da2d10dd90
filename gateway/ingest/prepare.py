"""Translating a message off the edge's event loop, and what keeps that safe.

The handler translates a message before it commits it (the original-mode ACK names what
could not be translated). Done on the event loop, one heavy message (5 MB, 20,000 OBX)
holds every other connection's ACK and /healthz for seconds. So the translation is handed
to a `Translators` service, the translator processes (`app/workers.py`); only its outcome
comes back (`Prepared`). A large frame is parsed, validated and translated in a process of its
own (`inspect`): that is what costs in proportion to its size.

Two things keep the hand-off safe: `Lanes` commits a connection's frames in the order they
came, whichever translation finished first; `Budget` (`protocol.py`, shared with the
listener) bounds the bytes held from receipt to commit (over it, the frame is answered AR
"resend later").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from gateway.audit.patient import reference_from_v2
from gateway.canonical import Translation
from gateway.fhir.bundle import dumps, to_bundle
from gateway.forward.routes import Router
from gateway.hl7.errors import ErrorCode, Hl7Error, Location
from gateway.hl7.message import Message, check_header, content_digest, parse_message
from gateway.hl7.validate import validate
from gateway.ingest.protocol import Budget as Budget  # the handler's name for it
from gateway.ingest.replay import patient_key, translate
from gateway.mapping.engine import Translator
from gateway.store.inbox import ACCEPTED, FAILED, TRANSLATED
from gateway.store.raw_form import packed

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A message's translation outcome as the handler needs it: its inbox status, the
    ERR, and (made where the translation ran) the Bundle JSON and a few counts."""

    # TRANSLATED, FAILED, UNSUPPORTED, or ACCEPTED (translation is off).
    status: str
    error: Hl7Error | None = None
    reason: str = ""
    # Only when translated in this process.
    translation: Translation | None = None
    # The Bundle JSON, when it was asked for (a remote FHIR backend takes it).
    bundle: bytes | None = None
    resources: int = 0
    unmapped: int = 0
    z_segments: int = 0

    @property
    def translated(self) -> bool:
        return self.status == TRANSLATED

    @property
    def error_text(self) -> str:
        return self.error.reason if self.error is not None else ""


@dataclass(frozen=True, slots=True)
class Request:
    """One message to translate: its bytes as received, when (its Provenance time), the
    patient key that decides which worker takes it, and whether to return the Bundle."""

    raw: bytes
    received_at: datetime
    charset: str
    patient_key: str
    want_bundle: bool
    strict: bool


class Translators(Protocol):
    """Translates a message elsewhere than on the event loop; None: do it here (a small
    frame when there is nowhere better)."""

    def translate(self, request: Request) -> asyncio.Future[Prepared] | None: ...


class Lanes:
    """Each connection's frames reach the inbox in the order they came: a frame whose
    translation is elsewhere holds the ones after it on its connection (only there)."""

    def __init__(self) -> None:
        self._tails: dict[Hashable, asyncio.Future[None]] = {}

    def busy(self, lane: Hashable) -> bool:
        return lane in self._tails

    def then(self, lane: Hashable, ready: asyncio.Future[T] | None,
             step: Callable[[T | BaseException | None], None]) -> None:
        """Call `step` with the outcome of `ready` (None if there is none) once it is done
        and every earlier frame of `lane` has taken its step."""
        before = self._tails.get(lane)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[lane] = mine

        async def wait_turn() -> None:
            try:
                if before is not None:
                    await asyncio.shield(before)
                outcome: T | BaseException | None = None
                if ready is not None:
                    try:
                        outcome = await ready
                    except Exception as exc:  # the step decides what it costs
                        outcome = exc
                step(outcome)
            finally:
                mine.set_result(None)
                if self._tails.get(lane) is mine:
                    del self._tails[lane]

        asyncio.create_task(wait_turn())


def settle(future: asyncio.Future[Prepared], value: Prepared | BaseException) -> None:
    """Resolve `future` unless its caller has gone."""
    with contextlib.suppress(asyncio.InvalidStateError):
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


def prepare(translator: Translator, request: Request, *, keep: bool) -> Prepared:
    """Translate one message (in whichever process or thread runs this); `keep`: return
    the Translation itself too (only where it is used: this process)."""
    try:
        message = parse_message(request.raw, request.charset)
    except Hl7Error as exc:  # the edge parsed it already: not expected
        return Prepared(FAILED, exc, exc.reason)
    return prepare_message(translator, message, request.received_at, keep=keep,
                           want_bundle=request.want_bundle, strict=request.strict)


def message_key(raw: bytes) -> bytes:
    """What a translation kept for its row is found by (the apply worker's `keep`): a
    digest of the bytes received."""
    return hashlib.blake2b(raw, digest_size=16).digest()


def prepare_message(translator: Translator, message: Message, at: datetime, *, keep: bool,
                    want_bundle: bool, strict: bool) -> Prepared:
    """`prepare` for a message already parsed."""
    try:
        replayed = translate(translator, message, at, strict=strict)
    except Exception as exc:  # a table or engine bug costs this message, not the process
        log.error("internal error translating an MLLP message: %s", type(exc).__name__)
        reason = "internal error while translating"
        return Prepared(FAILED, Hl7Error(ErrorCode.APPLICATION_INTERNAL_ERROR, reason),
                        reason)
    translation = replayed.translation
    if translation is None:
        return Prepared(replayed.status, replayed.error, replayed.reason)
    return Prepared(
        TRANSLATED, translation=translation if keep else None,
        bundle=dumps(to_bundle(translation)) if want_bundle else None,
        resources=len(translation.resources), unmapped=translation.unmapped_count,
        z_segments=translation.z_segments)


def check_content(message: Message, validation: str) -> list[Hl7Error]:
    """What refuses a message for its content: two messages in one frame, or what the
    `validation` level finds (the sender check, a header matter, is the handler's)."""
    text = message.to_text()
    if "\rMSH" in text or "\nMSH" in text:  # a batch, or two messages in one frame
        return [Hl7Error(ErrorCode.SEGMENT_SEQUENCE_ERROR,
                         "one MLLP frame must carry exactly one message",
                         Location("MSH", 2), reject=True)]
    return validate(message, validation)


# -- large frames, in a process of their own -------------------------------------------------
#
# A thread would not do: a thread translating 20,000 OBX holds the interpreter lock, and
# the event loop waits for it at every turn (hundreds of ms per ACK). So a large frame goes
# to a one-process pool: parse, validation, translation and digest there; back comes only
# the outcome, with what the edge's commit reads of the body (the patient key and the audit
# record's PID-3): the edge parses only the MSH line itself, so nothing on its event loop
# costs in proportion to the frame's size. The apply worker translates the stored row
# again, on its own thread.

_CHILD_TRANSLATOR: list[Translator] = []
_CHILD_NICENESS = 10
# How often the large-frame process checks that the gateway that started it is alive.
_PARENT_WATCH_SECONDS = 1.0


def start_child(tables: Path | None, site: Path | None, default_offset: str,
                cache: Path | None = None, parent: int | None = None) -> None:
    """The large-frame process's initializer: load the tables once (None: translation is
    off, the child only parses and validates), compiled ones from `cache` if there.

    The process runs at a lower priority: on a machine short of cores, a large frame's
    work yields the CPU to the edge and the workers, which answer every other message."""
    with contextlib.suppress(OSError):
        os.nice(_CHILD_NICENESS)
    # `parent` is the gateway's pid as it was when it started this process: read here,
    # the parent could already be gone (killed while this process was importing).
    threading.Thread(target=_exit_with_parent, args=(parent or os.getppid(),), daemon=True,
                     name="parent-watch").start()
    if tables is not None:
        _CHILD_TRANSLATOR[:] = [Translator.load(tables, site, default_offset, cache=cache)]


def _exit_with_parent(parent: int) -> None:
    """The large-frame process ends when the gateway that started it is gone. A pool
    worker waits on its call queue, whose write end it holds itself, so a gateway killed
    with SIGKILL (or crashing) would otherwise leave it waiting for ever."""
    while os.getppid() == parent:
        time.sleep(_PARENT_WATCH_SECONDS)
    os._exit(0)


@dataclass(frozen=True, slots=True)
class Inspected:
    """A large frame inspected in the child: why it is refused (nothing: accepted), its
    translation outcome (as `to_wire`), content digest, and what the commit reads of the
    body (set when accepted): the patient key, the audit record's patient and the frame
    as the inbox stores it (compressed: store/raw_form.py)."""

    errors: tuple[tuple[Any, ...], ...]
    prepared: tuple[Any, ...] | None = None
    digest: str = ""
    patient_key: str = ""
    patient: str | None = None
    packed: bytes | None = None


def inspect(frame: bytes, charset: str, validation: str, translate_it: bool,
            router: Router | None, at: datetime, strict: bool) -> Inspected:
    """Everything done to a frame before its commit that costs in proportion to its size."""
    try:
        message = parse_message(frame, charset)
        check_header(message.header)
    except Hl7Error as exc:
        return Inspected((error_to_wire(exc),))
    errors = check_content(message, validation)
    if errors:
        return Inspected(tuple(error_to_wire(e) for e in errors))
    key, patient = patient_key(message), reference_from_v2(message)
    # Compressed here, not on the edge's loop: the commit then writes (and a sealed data dir
    # encrypts) a tenth of the bytes.
    stored = packed(frame)
    if not translate_it or not _CHILD_TRANSLATOR:
        return Inspected((), to_wire(Prepared(ACCEPTED)), content_digest(message), key,
                         patient, stored)
    header = message.header
    want_bundle = router is not None and router.for_message(
        header.message_type, header.sending_application, header.sending_facility).needs_bundle
    prepared = prepare_message(_CHILD_TRANSLATOR[0], message, at, keep=False,
                               want_bundle=want_bundle, strict=strict)
    return Inspected((), to_wire(prepared), content_digest(message), key, patient, stored)


# Over a pipe between processes an Hl7Error travels as its parts (its constructor's
# arguments are not its args, so it does not pickle as itself).

def error_to_wire(error: Hl7Error) -> tuple[Any, ...]:
    return (int(error.code), error.reason, error.location, error.reject)


def error_from_wire(parts: tuple[Any, ...]) -> Hl7Error:
    code, text, location, reject = parts
    assert location is None or isinstance(location, Location)
    return Hl7Error(ErrorCode(code), text, location, reject=reject)


def to_wire(prepared: Prepared) -> tuple[Any, ...]:
    error = prepared.error
    return (prepared.status, None if error is None else error_to_wire(error),
            prepared.reason, prepared.bundle, prepared.resources, prepared.unmapped,
            prepared.z_segments)


def from_wire(wire: tuple[Any, ...]) -> Prepared:
    status, parts, reason, bundle, resources, unmapped, z_segments = wire
    error = None if parts is None else error_from_wire(parts)
    return Prepared(status, error, reason, None, bundle, resources, unmapped, z_segments)
