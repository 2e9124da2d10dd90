"""An apply worker process: `python -m gateway.app.worker_main FD INDEX COUNT PARENT`.

Started by the edge (`gateway.app.workers`), never by hand: reads its settings (pickled)
on stdin, talks to the edge over the socket FD, and follows the inbox, applying its share
of the patients to the FHIR store (`gateway.ingest.worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import logging
import os
import pickle
import signal
import socket
import sys
from collections.abc import Sequence

from gateway.app.memory import return_large_buffers
from gateway.app.sealing import store_codec
from gateway.app.specs import load_translator, search_registry
from gateway.app.state import FHIR_FILE, INBOX_FILE
from gateway.app.workers import receive, send
from gateway.config import Settings
from gateway.ingest.prepare import Request, prepare, to_wire
from gateway.ingest.worker import InboxFollower
from gateway.mapping.engine import Translator
from gateway.store import SqliteInbox
from gateway.store.fhir_sqlite import SqliteFhirStore

log = logging.getLogger("gateway.worker")

_PR_SET_PDEATHSIG = 1


def main(argv: Sequence[str] | None = None) -> int:
    fd, index, count, parent = (int(a) for a in (argv or sys.argv[1:])[:4])
    _die_with(parent)
    # Ctrl-C reaches the whole process group: the edge decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Until it follows the inbox a worker holds nothing: SIGTERM (the edge stopping during
    # our start) ends it at once instead of after the tables have loaded.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    settings: Settings = pickle.load(sys.stdin.buffer)  # from our own parent
    os.umask(0o077)
    return_large_buffers()  # a heavy row's buffers go back to the system
    from gateway.policy.redact import install

    logging.basicConfig(stream=sys.stderr, level=settings.log.level.upper(),
                        format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: "
                               "%(message)s")
    install()  # every log line through the PHI filter, as in the edge
    try:
        asyncio.run(_run(settings, fd, index, count))
    except Exception as exc:  # said in one line; the edge starts the worker again
        log.error("apply worker stopped: %s", type(exc).__name__)
        return 1
    return 0


def _die_with(parent: int) -> None:
    """Linux: the kernel kills this process when the edge dies (even by SIGKILL), so a
    restarted gateway never finds an old worker still applying."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the signal was set
        os._exit(1)


async def _run(settings: Settings, fd: int, index: int, count: int) -> None:
    store_settings = settings.store
    # One holder of each share at a time: a worker replaced after a crash waits here until
    # the old one is gone (the lock dies with its process).
    lock = os.open(store_settings.data_dir / f"apply-{index}.lock", os.O_CREAT | os.O_RDWR,
                   0o600)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, fcntl.flock, lock, fcntl.LOCK_EX)
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    translator = await loop.run_in_executor(None, load_translator, settings)
    registry = await loop.run_in_executor(None, search_registry, settings)
    # The edge has checked the data dir's keys and marker: the same codec opens it here.
    codec = await loop.run_in_executor(None, store_codec, settings)
    inbox = await SqliteInbox.open(store_settings.data_dir / INBOX_FILE,
                                   synchronous=store_settings.synchronous, codec=codec)
    store = await SqliteFhirStore.open(store_settings.data_dir / FHIR_FILE, registry.index,
                                       synchronous=store_settings.synchronous, codec=codec)
    follower: InboxFollower | None = None

    def report(done: Sequence[tuple[int, str]]) -> None:
        assert follower is not None
        send(writer, ("done", list(done), follower.depth, follower.batch_seconds * 1000,
                      store.write_seconds * 1000))

    follower = InboxFollower(store, registry, inbox, translator, report, share=index,
                             shares=count,
                             budget_bytes=settings.processes.memory_budget_bytes // 4)
    loop.add_signal_handler(signal.SIGTERM, follower.stop)
    _keep_out_of_collections()
    following = asyncio.create_task(follower.follow(), name="inbox-follower")
    send(writer, ("ready",))
    try:
        while not following.done():
            listening = asyncio.ensure_future(receive(reader))
            await asyncio.wait({listening, following}, return_when=asyncio.FIRST_COMPLETED)
            if not listening.done():
                listening.cancel()
                break
            item = listening.result()
            if item is None or item[0] == "stop":  # stopped, or the edge is gone
                follower.stop()
                break
            if item[0] == "translate":
                _translate(translator, follower, writer, item[1], item[2])
            else:
                follower.wake()
        await following
    finally:
        await store.close()
        await inbox.close()
        writer.close()
        os.close(lock)


def _keep_out_of_collections() -> None:
    """What start-up made (tables, the translator, the search registry, modules) lives as
    long as the process: the cyclic collector's full passes need not walk it again (they
    took ~130 ms each, 1.2 s of the worker's 15 s over `bench/apply_lag.py`; 0.8 s after;
    the rest is the translations kept for a backlog)."""
    gc.collect()
    gc.freeze()


def _translate(translator: Translator, follower: InboxFollower,
               writer: asyncio.StreamWriter, seq: int, request: Request) -> None:
    """Translate for the edge's ACK; keep the translation for when its row commits."""
    prepared = prepare(translator, request, keep=True)
    if prepared.translation is not None:
        follower.keep(request.raw, prepared.translation)
    send(writer, ("translated", seq, to_wire(prepared)))


if __name__ == "__main__":
    sys.exit(main())
