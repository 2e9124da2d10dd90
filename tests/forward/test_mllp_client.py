"""Reading ACKs on the sending side: only a readable MSA counts, in any delimiters."""

from __future__ import annotations

import pytest

from gateway.forward.mllp_client import parse_ack


@pytest.mark.parametrize(
    ("reply", "code", "control_id"),
    [
        (b"MSH|^~\\&|GW|F|A|B|20261126||ACK^A01^ACK|X1|P|2.5\rMSA|AA|CTRL-1\r", "AA", "CTRL-1"),
        (b"MSH#*~!&#GW#F#A#B#20261126##ACK*A04#X2#P#2.3\nMSA#AE#ENC-1\n", "AE", "ENC-1"),
        (b"MSA|AA|NO-MSH\r", "", ""),  # not a message: never a success
        (b"MSH|^~\\&|GW|F|A|B|20261126||ACK|X3|P|2.5\r", "", ""),  # no MSA
        (b"", "", ""),
    ],
)
def test_parse_ack(reply: bytes, code: str, control_id: str) -> None:
    ack = parse_ack(reply)
    assert (ack.code, ack.control_id) == (code, control_id)
