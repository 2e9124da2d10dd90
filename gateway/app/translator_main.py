"""A translator process: `python -m gateway.app.translator_main FD INDEX PARENT`.

Started by the edge (`gateway.app.workers`), never by hand. It translates small messages
for their ACKs and nothing else, so an ACK never waits behind an apply: in the apply
worker's process the request waited for its event loop and for the interpreter lock,
held for milliseconds at a time by the FHIR store's writer thread (ACK p99 88 ms at 200
msg/s on a quiet machine). Each answer carries the Translation itself (pickled), which the
edge hands to the apply worker that owns the patient, so the row is not translated twice.

One request at a time, in order, on a blocking socket: there is nothing to wait for
between them, and no event loop costs less per message.
"""

from __future__ import annotations

import logging
import pickle
import socket
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

from gateway.app.child import begin
from gateway.app.specs import load_translator
from gateway.app.workers import LENGTH
from gateway.ingest.prepare import Request, prepare, to_wire
from gateway.ingest.worker import message_key
from gateway.mapping.engine import Translator

log = logging.getLogger("gateway.translator")


def main(argv: Sequence[str] | None = None) -> int:
    fd, index, parent = (int(a) for a in (argv or sys.argv[1:])[:3])
    settings = begin("translator", index, parent)
    translator = load_translator(settings)
    try:
        with socket.socket(fileno=fd) as sock, sock.makefile("rb") as incoming:
            _serve(translator, sock, incoming)
    except Exception as exc:  # said in one line; the edge starts the translator again
        log.error("translator stopped: %s", type(exc).__name__)
        return 1
    return 0


def _serve(translator: Translator, sock: socket.socket, incoming: BinaryIO) -> None:
    """Answer the edge's requests until it says stop or is gone."""
    _send(sock, ("ready",))
    while (item := _receive(incoming)) is not None and item[0] == "translate":
        _send(sock, _translated(translator, item[1], item[2]))


def _translated(translator: Translator, seq: int, request: Request) -> tuple[Any, ...]:
    """("translated", seq, the outcome for the ACK, (key, size, pickled Translation) for
    the apply worker or None)."""
    prepared = prepare(translator, request, keep=True)
    kept = None
    if prepared.translation is not None:
        kept = (message_key(request.raw), len(request.raw),
                pickle.dumps(prepared.translation, protocol=pickle.HIGHEST_PROTOCOL))
    return ("translated", seq, to_wire(prepared), kept)


def _send(sock: socket.socket, item: tuple[Any, ...]) -> None:
    body = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(LENGTH.pack(len(body)) + body)


def _receive(incoming: BinaryIO) -> tuple[Any, ...] | None:
    """The next frame from the edge; None at its end."""
    head = incoming.read(LENGTH.size)
    if len(head) < LENGTH.size:
        return None
    body = incoming.read(LENGTH.unpack(head)[0])
    item = pickle.loads(body)  # from our own parent
    assert isinstance(item, tuple)
    return item


if __name__ == "__main__":
    sys.exit(main())
