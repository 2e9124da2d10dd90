"""A message without a segment its structure requires (an ADT^A01 without PID) is refused
over MLLP with an ERR naming the segment (code 100), by the HL7 message structure of its
version, and nothing of it is stored."""

from __future__ import annotations

from conftest import MllpPeer, RunningGateway, segments
from gateway.app.files import INBOX_FILE
from gateway.store.inbox_sqlite import read_entries

HEADER = (b"MSH|^~\\&|SYNTHLAB|SYNTHHOSP|ISTHMUS|GATEWAY|20261126083000+0100||%s|%s|P|2.5.1\r"
          b"EVN|A01|20261126082900\r")
PID = b"PID|1||MRN-7101^^^SYNTHHOSP^MR||CANARYNOPID^Ana||19800102|F\r"
PV1 = b"PV1|1|I|WARD1^101^A\r"


async def exchange(port: int, message: bytes) -> dict[str, list[list[str]]]:
    peer = await MllpPeer.open(port)
    try:
        return segments(await peer.request(message))
    finally:
        await peer.close()


async def test_an_adt_a01_without_pid_is_refused_naming_pid(gateway: RunningGateway) -> None:
    ack = await exchange(gateway.mllp_port, HEADER % (b"ADT^A01^ADT_A01", b"NOPID-1") + PV1)
    assert ack["MSA"][0][1] in ("AE", "AR")
    assert ack["MSA"][0][2] == "NOPID-1"
    [err] = ack["ERR"]
    assert err[2].split("^")[0] == "PID"  # ERR-2: the segment missing
    assert err[3].split("^")[0] == "100"  # segment sequence error
    assert await read_entries(gateway.data_dir / INBOX_FILE) == []


async def test_every_missing_segment_is_named_and_the_complete_message_accepted(
        gateway: RunningGateway) -> None:
    ack = await exchange(gateway.mllp_port, HEADER % (b"ADT^A01", b"NOPID-2"))
    assert [e[2].split("^")[0] for e in ack["ERR"]] == ["PID", "PV1"]
    ack = await exchange(gateway.mllp_port, HEADER % (b"ADT^A01", b"WITHPID-3") + PID + PV1)
    assert ack["MSA"][0][1] == "AA"
