"""Acknowledgement semantics on the MLLP edge: original and enhanced mode, and bad input."""

from __future__ import annotations

import pytest

from conftest import MllpPeer, RunningGateway, message, segments, with_control_id
from support.builders import with_fields

ADT = message("adt_a01.hl7")


async def test_original_mode_ack_swaps_sender_and_echoes_control_id(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    ack = segments(await peer.request(with_control_id(ADT, "ORIG-1")))
    msh, msa = ack["MSH"][0], ack["MSA"][0]
    assert msh[2] == "^~\\&"
    assert (msh[3], msh[4], msh[5], msh[6]) == ("ISTHMUS", "GATEWAY", "SYNTHLAB", "SYNTHHOSP")
    assert msh[9] == "ACK^A01^ACK"
    assert msh[10] and msh[10] != "ORIG-1"
    assert msh[12] == "2.5.1"
    assert msa[1:3] == ["AA", "ORIG-1"]
    assert "ERR" not in ack
    await peer.close()


async def test_ack_uses_inbound_encoding_characters_and_version(
        gateway: RunningGateway) -> None:
    raw = (b"MSH#*~!&#SENDAPP#SENDFAC#RCVAPP#RCVFAC#20261126##ADT*A04#ENC-1#P#2.3\r"
           b"PID#1##MRN-9##DOE*JOHN\r")
    peer = await MllpPeer.open(gateway.mllp_port)
    ack = (await peer.request(raw)).decode()
    assert ack.startswith("MSH#*~!&#RCVAPP#RCVFAC#SENDAPP#SENDFAC#")
    assert "#ACK*A04#" in ack and "#2.3\r" in ack
    assert "\rMSA#AA#ENC-1\r" in ack
    await peer.close()


@pytest.mark.parametrize(
    ("accept", "expect_reply"),
    [("AL", True), ("SU", True), ("ER", False), ("NE", False)],
)
async def test_enhanced_mode_accept_ack_honours_msh15_on_success(
        gateway: RunningGateway, accept: str, expect_reply: bool) -> None:
    raw = with_fields(with_control_id(ADT, f"ENH-{accept}"), "MSH", {15: accept, 16: "AL"})
    peer = await MllpPeer.open(gateway.mllp_port)
    await peer.send(raw)
    if expect_reply:
        msa = segments(await peer.reply())["MSA"][0]
        assert msa[1:3] == ["CA", f"ENH-{accept}"]
    else:
        # Nothing comes back for this one, but the message is stored all the same.
        probe = with_control_id(ADT, f"PROBE-{accept}")
        assert segments(await peer.request(probe))["MSA"][0][1:3] == ["AA", f"PROBE-{accept}"]
    rows = await gateway.inbox.list(10)
    assert f"ENH-{accept}" in {r.control_id for r in rows}
    await peer.close()


@pytest.mark.parametrize(
    ("accept", "expect_reply"),
    [("AL", True), ("ER", True), ("SU", False), ("NE", False)],
)
async def test_enhanced_mode_accept_ack_honours_msh15_on_error(
        gateway: RunningGateway, accept: str, expect_reply: bool) -> None:
    raw = with_fields(with_control_id(ADT, f"ENHERR-{accept}"), "MSH",
                      {15: accept, 12: "9.9"})
    peer = await MllpPeer.open(gateway.mllp_port)
    await peer.send(raw)
    if expect_reply:
        msa = segments(await peer.reply())["MSA"][0]
        assert msa[1:3] == ["CR", f"ENHERR-{accept}"]
    else:
        probe = with_control_id(ADT, f"PROBE-{accept}")
        assert segments(await peer.request(probe))["MSA"][0][1] == "AA"
    await peer.close()


BAD_INPUTS = [
    # (name, bytes, MSA-1, ERR-3.1 code, ERR-2 location)
    ("not hl7", b"hello, this is not HL7", "AR", "100", "MSH^1"),
    ("empty frame", b"", "AR", "100", "MSH^1"),
    ("no MSH", b"PID|1||MRN-1||DOE^JANE\r", "AR", "100", "MSH^1"),
    ("broken MSH-2", b"MSH|^~|A|B|C|D|20261126||ADT^A01|BAD-2|P|2.5\r", "AR", "102",
     "MSH^1^2"),
    ("missing MSH-9", b"MSH|^~\\&|A|B|C|D|20261126|||BAD-9|P|2.5\r", "AR", "101",
     "MSH^1^9"),
    ("missing MSH-10", b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01||P|2.5\r", "AR", "101",
     "MSH^1^10"),
    ("unknown version", b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01|BAD-V|P|3.0\r", "AR", "203",
     "MSH^1^12"),
    ("bad charset", b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01|BAD-CS|P|2.5||||||KLINGON\r",
     "AR", "103", "MSH^1^18"),
    ("undecodable bytes",
     b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01|BAD-UTF|P|2.5||||||UNICODE UTF-8\r"
     b"PID|1||M1||\xff\xfeDOE\r", "AE", "102", "MSH^1^18"),
    # MSH-15 valued means enhanced mode, so the answer is a commit error.
    ("bad accept ack type", b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01|BAD-15|P|2.5|||XX\r",
     "CE", "103", "MSH^1^15"),
    ("two messages in one frame",
     b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01|TWO-1|P|2.5\rPID|1\r"
     b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01|TWO-2|P|2.5\rPID|1\r", "AR", "100", "MSH^2"),
]


@pytest.mark.parametrize(("name", "raw", "code", "err_code", "location"), BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_gets_nak_with_err_and_connection_stays_usable(
        gateway: RunningGateway, name: str, raw: bytes, code: str, err_code: str,
        location: str) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    ack = segments(await peer.request(raw))
    assert ack["MSA"][0][1] == code, name
    err = ack["ERR"][0]
    assert err[2] == location
    assert err[3].split("^")[0] == err_code
    assert err[3].endswith("^HL70357")
    assert err[4] == "E"
    # The same connection still carries a good message.
    good = segments(await peer.request(with_control_id(ADT, f"AFTER-{name}")))
    assert good["MSA"][0][1] == "AA"
    await peer.close()
    assert await gateway.inbox.count() == 1


async def test_nak_never_echoes_phi(gateway: RunningGateway) -> None:
    raw = (b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01|PHI-1|P|2.5||||||UNICODE UTF-8\r"
           b"PID|1||M1||CANARYFAMILY^\xff\r")
    peer = await MllpPeer.open(gateway.mllp_port)
    ack = await peer.request(raw)
    assert b"CANARYFAMILY" not in ack
    await peer.close()


async def test_pre_25_versions_get_err_1_and_msa_3(gateway: RunningGateway) -> None:
    raw = b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01|OLD-1|P|2.3\rPID|1||M1||DOE^\xff\r"
    peer = await MllpPeer.open(gateway.mllp_port)
    ack = segments(await peer.request(raw))
    assert ack["MSA"][0][1:3] == ["AE", "OLD-1"]
    assert "MSH-18" in ack["MSA"][0][3]
    assert ack["ERR"][0][1] == "MSH^1^18^102&Data type error&HL70357"
    await peer.close()


async def test_ack_declares_and_uses_the_inbound_character_set(
        gateway: RunningGateway) -> None:
    raw = ("MSH|^~\\&|LABO|HÔPITAL|ISTHMUS|GW|20261126||ADT^A01|LATIN-1|P|2.5||||||8859/1\r"
           "PID|1||M1||DURAND^Zoé\r").encode("iso-8859-1")
    peer = await MllpPeer.open(gateway.mllp_port)
    ack = await peer.request(raw)
    msh = segments(ack, "iso-8859-1")["MSH"][0]
    assert msh[5] == "LABO" and msh[6] == "HÔPITAL"
    assert msh[18] == "8859/1"
    assert "HÔPITAL".encode("iso-8859-1") in ack
    await peer.close()
