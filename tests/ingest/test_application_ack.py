"""Enhanced mode: the accept ACK (CA) answers the commit; the application ACK (MSH-16)
follows on the same connection once the message is applied to the FHIR store."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import MllpPeer, message, segments, start_gateway, with_control_id
from support.builders import with_fields

ADT = message("mapping_adt_a01.hl7")


@pytest.mark.parametrize(("application", "broken", "expected"), [
    ("AL", False, "AA"),
    ("SU", False, "AA"),
    ("AL", True, "AE"),
    ("ER", True, "AE"),
])
async def test_application_ack_follows_the_commit_ack(
        tmp_path: Path, application: str, broken: bool, expected: str) -> None:
    raw = with_control_id(with_fields(ADT, "MSH", {15: "AL", 16: application}),
                          f"APPACK-{application}")
    if broken:
        raw = with_fields(raw, "PID", {7: b"19851345"})
    gw = await start_gateway(tmp_path / "var")
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        try:
            commit = segments(await peer.request(raw))
            application_ack = segments(await peer.reply(timeout=10))
        finally:
            await peer.close()
    finally:
        await gw.runner.cleanup()
    assert commit["MSA"][0][1] == "CA"
    assert application_ack["MSA"][0][1] == expected
    assert application_ack["MSA"][0][2] == f"APPACK-{application}"
    # A new message of our own, not a copy of the commit ACK.
    assert application_ack["MSH"][0][10] != commit["MSH"][0][10]
    if broken:
        assert "PID" in "|".join(application_ack["ERR"][0])
        assert "19851345" not in "|".join(application_ack["ERR"][0])


@pytest.mark.parametrize(("application", "broken"), [
    ("NE", False), ("", False), ("SU", True), ("ER", False)])
async def test_no_application_ack_when_msh16_does_not_ask(
        tmp_path: Path, application: str, broken: bool) -> None:
    raw = with_control_id(with_fields(ADT, "MSH", {15: "AL", 16: application}), "APPACK-NONE")
    if broken:
        raw = with_fields(raw, "PID", {7: b"19851345"})
    gw = await start_gateway(tmp_path / "var")
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        try:
            commit = segments(await peer.request(raw))
            # A second message on the same connection: its commit ACK must be the very
            # next frame, so no application ACK was sent for the first in between.
            second = segments(await peer.request(with_control_id(raw, "APPACK-NEXT")))
        finally:
            await peer.close()
    finally:
        await gw.runner.cleanup()
    assert commit["MSA"][0][1] == "CA"
    assert second["MSA"][0][2] == "APPACK-NEXT"
