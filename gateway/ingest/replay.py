"""Translate a stored message as it was received: one outcome for every caller.

The handler translates a message before committing it; the applier translates a row again
when its turn comes (the start-up sweep, a backlog not kept in memory); `isthmus inbox
replay` translates failed rows again after a table is fixed. All three go through
`translate`, so a message gets the same status and the same error text whichever did it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import orjson

from gateway.canonical import Translation
from gateway.fhir.bundle import dumps, to_bundle
from gateway.fhir.validate import InvalidResource, validate_resource
from gateway.forward.routes import Router, Targets
from gateway.hl7.errors import ErrorCode, Hl7Error
from gateway.hl7.message import Message, parse_message
from gateway.mapping.engine import Translator
from gateway.mapping.errors import TranslationError, UnsupportedMessage
from gateway.store.inbox import FAILED, ROUTED, TRANSLATED, UNSUPPORTED, Replayed


@dataclass(frozen=True, slots=True)
class Replay:
    """A message's translation outcome: its inbox status and what goes with it."""

    # TRANSLATED, FAILED or UNSUPPORTED (ACCEPTED: translation is off).
    status: str
    translation: Translation | None = None
    # FAILED: where and why, for the ERR segment and the inbox (never a value).
    error: Hl7Error | None = None
    # FAILED or UNSUPPORTED: why there is no translation, as `isthmus inbox replay` shows it.
    reason: str = ""
    # The parsed message; None when the stored bytes no longer parse.
    message: Message | None = None

    @property
    def error_text(self) -> str:
        """The inbox row's error as the running gateway stores it ('' unless FAILED)."""
        return self.error.reason if self.error is not None else ""


def translate(translator: Translator, message: Message, at: datetime, *,
              strict: bool = False) -> Replay:
    """Translate a parsed message as received at `at` (its Provenance time).

    Only the translator's own refusals become an outcome; anything else (a table or engine
    bug) propagates, for the caller to decide what one bug may cost."""
    try:
        translation = translator.translate(message, at)
        if strict:
            check_bundle(translation)
    except UnsupportedMessage as exc:
        return Replay(UNSUPPORTED, reason=exc.safe_text, message=message)
    except TranslationError as exc:
        return Replay(FAILED, error=translation_error(exc), reason=exc.safe_text,
                      message=message)
    return Replay(TRANSLATED, translation, message=message)


def replay(translator: Translator, raw: bytes, received_at: datetime) -> Replay:
    """A stored message translated again as it was when received (its Provenance time
    too); bytes that no longer parse are FAILED with the parse error."""
    try:
        message = parse_message(raw)
        return translate(translator, message, received_at)
    except Hl7Error as exc:
        return Replay(FAILED, error=exc, reason=exc.reason)


def replay_routed(translator: Translator, router: Router | None, inbox_id: int, raw: bytes,
                  received_at: datetime, *, routed: bool = True) -> Replayed:
    """A stored row replayed, and where its route now sends it: the local store (status
    translated, applied by the gateway's sweep) and the FHIR backends that could not take
    it untranslated (their Bundle and outbox rows), as `isthmus inbox replay` records it.

    `routed=False`: the row was never routed (a control id conflict, kept undelivered), so
    every remote backend of its route is owed it, the MLLP ones (raw) even untranslated."""
    outcome = replay(translator, raw, received_at)
    if outcome.translation is None or outcome.message is None:
        if routed or router is None or outcome.message is None:
            return Replayed(inbox_id, outcome.status, outcome.reason)
        raw_only = router.untranslated(_targets(router, outcome.message)).remote
        return Replayed(inbox_id, outcome.status, outcome.reason, routes=raw_only,
                        patient_key=patient_key(outcome.message) if raw_only else "")
    if router is None:
        return Replayed(inbox_id, TRANSLATED)
    targets = _targets(router, outcome.message)
    owed = tuple(n for n in targets.remote
                 if not routed or n not in router.untranslated(targets).remote)
    return Replayed(inbox_id, TRANSLATED if targets.local else ROUTED, routes=owed,
                    patient_key=patient_key(outcome.message) if owed else "",
                    bundle=dumps(to_bundle(outcome.translation)) if owed else None)


def _targets(router: Router, message: Message) -> Targets:
    header = message.header
    return router.for_message(header.message_type, header.sending_application,
                              header.sending_facility)


def patient_key(message: Message) -> str:
    """Orders one patient's deliveries: a hash of PID-3's first identifier and its
    assigning authority (the outbox keeps this, never the identifier). '' if none."""
    identifier = message.get("PID-3.1")
    if not identifier:
        return ""
    authority = message.get_raw("PID-3(1).4")
    return hashlib.sha256(f"{authority}\x1f{identifier}".encode()).hexdigest()[:32]


def translation_error(exc: TranslationError) -> Hl7Error:
    """The ERR for a message that could not be translated: where, and why (no value)."""
    code = ErrorCode.DATA_TYPE_ERROR if exc.value is not None else (
        ErrorCode.APPLICATION_INTERNAL_ERROR)
    return Hl7Error(code, exc.safe_text, exc.v2_location)


def check_bundle(translation: Translation) -> None:
    """Strict mode: validate the whole output with the R4 models (slow; for new tables)."""
    try:
        validate_resource(orjson.loads(dumps(to_bundle(translation))))
    except InvalidResource as exc:
        raise TranslationError("", f"the output is not valid FHIR R4 ({exc})") from None
