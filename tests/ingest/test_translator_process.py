"""The translator process's serving loop (`app/translator_main._serve`), on a real socket
pair with the shipped tables: each answer is written as soon as it is made.

Answering the requests that came together in one write made the first one's ACK wait for
the last one's translation (2.2 of the edge's 7.4 ms mean wait at 8 lock-step
connections, bench/README.md "The ACK path's waits")."""

from __future__ import annotations

import os
import pickle
import select
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.app.translator_main import _serve
from gateway.app.wire import LENGTH, frame, request_to_wire
from gateway.canonical import wire
from gateway.config.loader import load_settings
from gateway.hl7.message import parse_message
from gateway.ingest.prepare import Request, from_wire, message_key
from gateway.mapping.engine import Translator

ROOT = Path(__file__).resolve().parent.parent.parent
MESSAGES = ROOT / "tests" / "messages"
MSH = "MSH|^~\\&|SYNTHLAB|SYNTHHOSP|ISTHMUS|GATEWAY|20261126083000||{type}|{id}|P|2.5.1"


def _slow_oru(observations: int) -> bytes:
    """A legal ORU^R01 whose translation takes long enough to see what is written first."""
    lines = [MSH.format(type="ORU^R01^ORU_R01", id="SLOW-1"),
             "PID|1||MRN-SLOW^^^SYNTHHOSP^MR||SYNTHETIC^Slow||19800102|F",
             "OBR|1|ORD-SLOW|FIL-SLOW|24331-1^Lipid panel^LN|||20261126080000"]
    lines += [f"OBX|{n}|NM|2093-3^Cholesterol^LN|{n}|{100 + n % 50}|mg/dL|||||F"
              for n in range(1, observations + 1)]
    return ("\r".join(lines) + "\r").encode()


def _request(raw: bytes) -> tuple[Any, ...]:
    return request_to_wire(Request(raw, datetime(2026, 11, 26, 8, 30, tzinfo=UTC), "ASCII",
                                   "", False, False))


def _read_frame(sock: socket.socket) -> tuple[Any, ...]:
    header = _read_exactly(sock, LENGTH.size)
    (size,) = LENGTH.unpack(header)
    item = pickle.loads(_read_exactly(sock, size))
    assert isinstance(item, tuple)
    return item


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the translator closed the socket"
        data += chunk
    return bytes(data)


def test_each_answer_is_written_before_the_next_request_is_translated() -> None:
    translator = Translator.load(generate=False)
    edge, child = socket.socketpair()
    serving = threading.Thread(target=_serve, args=(translator, child), daemon=True)
    serving.start()
    try:
        assert _read_frame(edge) == ("ready",)
        small = (MESSAGES / "adt_a01.hl7").read_bytes()
        # Both requests in one write, as the edge sends what one loop turn produced.
        edge.sendall(frame(("translate", 1, _request(small)))
                     + frame(("translate", 2, _request(_slow_oru(3000)))))

        first = _read_frame(edge)
        # The slow message is still being translated: nothing of its answer has been
        # written. Had the answers been written together, it would be here already.
        readable, _, _ = select.select([edge], [], [], 0)
        second = _read_frame(edge)
    finally:
        edge.sendall(frame(("stop",)))
        serving.join(timeout=30)
        edge.close()
        child.close()
    assert not serving.is_alive()
    assert first[:2] == ("translated", 1)
    assert from_wire(first[2]).translated and first[3] is not None
    # For the apply worker: the message's key and its Translation in the wire form.
    key, kept = first[3]
    assert key == message_key(small)
    handed = wire.decode(kept)
    again = translator.translate(parse_message(small), handed.provenance.received_at)
    assert [(r.resource_type, r.id, r.content) for r in handed.resources] == [
        (r.resource_type, r.id, r.content) for r in again.resources]
    assert readable == []
    assert second[:2] == ("translated", 2)
    assert from_wire(second[2]).translated


def test_a_bad_table_stops_the_translator_in_one_line_without_a_traceback(
        tmp_path: Path) -> None:
    # The edge loads the same tables and names the file and line; a translator it started
    # first must not print a traceback beside that (it did, when it lost the race).
    site = tmp_path / "site" / "segments"
    site.mkdir(parents=True)
    (site / "ZPI-Patient.csv").write_text(
        "location,condition,fhir_path,fhir_type,data_type_map,vocabulary,value,note\n"
        "ZPI-2,,colour,string,,,,\n")
    settings = load_settings(environ={}, overrides={
        "mapping.site_dir": str(tmp_path / "site"), "store.data_dir": str(tmp_path / "var")})
    ours, theirs = socket.socketpair()
    with ours, theirs:
        child = subprocess.run(
            [sys.executable, "-m", "gateway.app.translator_main", str(theirs.fileno()), "0",
             str(os.getpid())],
            input=pickle.dumps(settings), capture_output=True, timeout=60,
            pass_fds=(theirs.fileno(),), env={**os.environ, "PYTHONPATH": str(ROOT)})
    stderr = child.stderr.decode()
    assert child.returncode == 1
    assert "translator stopped: TableErrors" in stderr
    assert "Traceback" not in stderr
