"""A translator process: `python -m gateway.app.translator_main FD INDEX PARENT`.

Started by the edge (`gateway.app.workers`), never by hand. It translates small messages
for their ACKs and nothing else, so an ACK never waits behind an apply: in the apply
worker's process the request waited for its event loop and for the interpreter lock,
held for milliseconds at a time by the FHIR store's writer thread (ACK p99 88 ms at 200
msg/s on a quiet machine). Each answer carries the Translation itself (its wire form,
`canonical/wire.py`), which the edge hands to the apply worker that owns the patient, so
the row is not translated twice.

On a blocking socket, no event loop: there is nothing to wait for between requests. Each
answer is written as soon as it is made, in order: answering the requests that came
together in one write made the first wait for the last (per-hop time stamps at 8 lock-step
connections: 2.2 ms of the edge's 7.4 ms mean wait for a translation; see bench/README.md).
"""

from __future__ import annotations

import logging
import pickle
import socket
import sys
from collections.abc import Sequence
from typing import Any

from gateway.app.child import begin
from gateway.app.tables import load_translator
from gateway.app.wire import LENGTH, frame, request_from_wire
from gateway.canonical import wire
from gateway.ingest.prepare import Request, message_key, prepare, to_wire
from gateway.mapping.engine import Translator

log = logging.getLogger("gateway.translator")

_READ_BYTES = 256 * 1024


def main(argv: Sequence[str] | None = None) -> int:
    fd, index, parent = (int(a) for a in (argv or sys.argv[1:])[:3])
    settings = begin("translator", index, parent)
    try:
        # A bad table ends this process in one line too: the edge, which loads the same
        # tables, names the file and line and stops the start.
        translator = load_translator(settings)
        with socket.socket(fileno=fd) as sock:
            _serve(translator, sock)
    except Exception as exc:  # said in one line; the edge starts the translator again
        log.error("translator stopped: %s", type(exc).__name__)
        return 1
    return 0


def _serve(translator: Translator, sock: socket.socket) -> None:
    """Answer the edge's requests until it says stop or is gone."""
    sock.sendall(frame(("ready",)))
    pending = bytearray()
    while chunk := sock.recv(_READ_BYTES):
        pending += chunk
        items = _frames(pending)
        for item in items:
            if item[0] != "translate":
                return  # "stop"
            sock.sendall(frame(_translated(translator, item[1], request_from_wire(item[2]))))


def _frames(pending: bytearray) -> list[tuple[Any, ...]]:
    """The complete frames at the start of `pending`, taken out of it."""
    items = []
    start = 0
    while len(pending) - start >= LENGTH.size:
        (size,) = LENGTH.unpack_from(pending, start)
        end = start + LENGTH.size + size
        if end > len(pending):
            break
        item = pickle.loads(pending[start + LENGTH.size:end])  # from our own parent
        assert isinstance(item, tuple)
        items.append(item)
        start = end
    del pending[:start]
    return items


def _translated(translator: Translator, seq: int, request: Request) -> tuple[Any, ...]:
    """("translated", seq, the outcome for the ACK, (key, the Translation's wire form) for
    the apply worker or None)."""
    prepared = prepare(translator, request, keep=True)
    kept = None
    if prepared.translation is not None:
        kept = (message_key(request.raw), wire.encode(prepared.translation))
    return ("translated", seq, to_wire(prepared), kept)


if __name__ == "__main__":
    sys.exit(main())
