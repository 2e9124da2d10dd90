"""Ingest: one MLLP message from frame to ACK and on to the local store.

`handler` parses, checks, translates, routes and commits a frame with its ACK (`answer`
builds the ACKs and refusals); `applier` applies committed translations to the FHIR store;
`replay` translates a stored message again as it was received. The MLLP listener sees
only `protocol`.
"""

from gateway.ingest.applier import LocalApplier, Outcome, bundle_writes
from gateway.ingest.handler import Applied, Ingest, IngestOptions, Routing
from gateway.ingest.protocol import FrameHandler, Peer, Push, Reply, SenderCheck
from gateway.ingest.replay import (
    Replay,
    check_bundle,
    patient_key,
    replay,
    replay_routed,
    translate,
    translation_error,
)

__all__ = ["Applied", "FrameHandler", "Ingest", "IngestOptions", "LocalApplier", "Outcome",
           "Peer", "Push", "Reply", "Replay", "Routing", "SenderCheck", "bundle_writes",
           "check_bundle", "patient_key", "replay", "replay_routed", "translate",
           "translation_error"]
