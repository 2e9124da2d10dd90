"""One translation of a stored message for the handler, the applier and `inbox replay`:
the same status and the same texts whichever calls it, and never a value in them."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.fhir.bundle import dumps, to_bundle
from gateway.forward.routes import LOCAL, Route, Router
from gateway.hl7.message import parse_message
from gateway.ingest.replay import patient_key, replay, replay_routed
from gateway.store.inbox import FAILED, ROUTED, TRANSLATED, UNSUPPORTED
from support.mapping import translator

RECEIVED = datetime(2026, 11, 26, 7, 30, tzinfo=UTC)
BAD_DATE = "19851345"  # month 13: not a date, and the canary for "no value in any text"
HEADER = "MSH|^~\\&|SYNTHLAB|SYNTHHOSP|ISTHMUS|GATEWAY|20261126083000||{type}|{id}|P|2.5.1"
GOOD = ("\r".join([HEADER.format(type="ADT^A01", id="RP-OK"), "EVN|A01|20261126082900",
                   "PID|1||MRN-7101^^^SYNTHHOSP^MR||CANARYREPLAY^Ana||19800102|F",
                   "PV1|1|I|WARD1^101^A"]) + "\r").encode()
BAD = GOOD.replace(b"19800102", BAD_DATE.encode()).replace(b"RP-OK", b"RP-BAD")
# An event hl7 defines but no shipped table maps (ADT^A17, swap patients).
UNMAPPED = GOOD.replace(b"ADT^A01", b"ADT^A17").replace(b"EVN|A01", b"EVN|A17")


def test_a_message_that_translates_is_translated_as_received() -> None:
    outcome = replay(translator(), GOOD, RECEIVED)
    assert outcome.status == TRANSLATED and outcome.error is None
    assert outcome.translation is not None
    assert outcome.translation.provenance.message_type == "ADT^A01"
    assert outcome.error_text == outcome.reason == ""


def test_a_translation_error_names_the_field_and_no_value() -> None:
    outcome = replay(translator(), BAD, RECEIVED)
    assert outcome.status == FAILED and outcome.translation is None
    assert outcome.error is not None and str(outcome.error.location).startswith("PID")
    # The inbox text (applier, handler) and the replay text (CLI) are the same words.
    assert outcome.error_text == outcome.reason
    assert outcome.reason.startswith("PID-7:") and BAD_DATE not in outcome.reason


def test_an_unmapped_type_is_unsupported_with_no_inbox_error() -> None:
    outcome = replay(translator(), UNMAPPED, RECEIVED)
    assert outcome.status == UNSUPPORTED and outcome.translation is None
    # The live gateway stores no error for it; `inbox replay` shows why.
    assert outcome.error_text == "" and outcome.reason


def test_bytes_that_no_longer_parse_fail_with_the_parse_error() -> None:
    outcome = replay(translator(), b"not a message", RECEIVED)
    assert outcome.status == FAILED and outcome.message is None
    assert outcome.error is not None and outcome.error_text == outcome.reason != ""


def test_replay_without_routes_leaves_it_to_the_local_store() -> None:
    replayed = replay_routed(translator(), None, 7, GOOD, RECEIVED)
    assert (replayed.inbox_id, replayed.status, replayed.routes, replayed.bundle) == (
        7, TRANSLATED, (), None)
    assert replay_routed(translator(), None, 8, BAD, RECEIVED).status == FAILED


def test_replay_owes_the_bundle_to_the_fhir_backends_its_route_names() -> None:
    router = Router((Route(to=("ehr", "lab"), message="ADT^*"),), {"ehr": "fhir", "lab": "mllp"})
    replayed = replay_routed(translator(), router, 9, GOOD, RECEIVED)
    # Only the FHIR backend could not take it untranslated; the MLLP one already has it.
    assert replayed.status == ROUTED and replayed.routes == ("ehr",)
    translation = replay(translator(), GOOD, RECEIVED).translation
    assert translation is not None
    assert replayed.bundle == dumps(to_bundle(translation))
    assert replayed.patient_key == patient_key(parse_message(GOOD)) != ""
    local = Router((Route(to=(LOCAL, "ehr"), message="ADT^*"),), {"ehr": "fhir"})
    assert replay_routed(translator(), local, 9, GOOD, RECEIVED).status == TRANSLATED
