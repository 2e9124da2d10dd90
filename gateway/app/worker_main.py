"""An apply worker process: `python -m gateway.app.worker_main FD INDEX COUNT PARENT`.

Started by the edge (`gateway.app.workers`), never by hand: reads its settings (pickled)
on stdin, talks to the edge over the socket FD, and follows the inbox, applying its share
of the patients to the FHIR store (`gateway.ingest.worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from gateway.app.child import begin
from gateway.app.files import FHIR_FILE, INBOX_FILE
from gateway.app.sealing import store_codec
from gateway.app.tables import load_translator, search_registry
from gateway.app.wire import receive, send
from gateway.config import Settings
from gateway.ingest.worker import InboxFollower, kept_bytes_max
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.inbox_sqlite import SqliteInbox

log = logging.getLogger("gateway.worker")

# Applying may lag (the rows are committed and acknowledged); the ACKs may not. On a
# machine short of CPU the edge and the translators, at 0, go first: at the same
# priority the apply, always behind during a burst and so always runnable, took the edge
# its share (/healthz p99 over 90 ms at 200 msg/s on a loaded 2-core machine). The
# large-frame process runs at 10 too.
_NICENESS = 10


def main(argv: Sequence[str] | None = None) -> int:
    fd, index, count, parent = (int(a) for a in (argv or sys.argv[1:])[:4])
    settings = begin("worker", index, parent)
    with contextlib.suppress(OSError):
        os.nice(_NICENESS)
    try:
        asyncio.run(_run(settings, fd, index, count))
    except Exception as exc:  # said in one line; the edge starts the worker again
        log.error("apply worker stopped: %s", type(exc).__name__)
        return 1
    return 0


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
                                       synchronous=store_settings.synchronous, codec=codec,
                                       string_groups=registry.string_groups())
    follower: InboxFollower | None = None

    def report(done: Sequence[tuple[int, str]]) -> None:
        assert follower is not None
        again, follower.translated_again = follower.translated_again, 0
        send(writer, ("done", list(done), follower.depth, follower.batch_seconds * 1000,
                      store.write_seconds * 1000, again))

    follower = InboxFollower(store, registry, inbox, translator, report, share=index,
                             shares=count,
                             budget_bytes=settings.processes.memory_budget_bytes // 4,
                             kept_bytes=kept_bytes_max(settings.processes.memory_budget_bytes,
                                                       count))
    _keep_out_of_collections()
    send(writer, ("ready",))
    # The edge answers with the translations it held while this worker started, then the
    # first wake: the inbox is read only after that, so those rows are not made again.
    # Until then SIGTERM ends the process at once (`child.begin`): it holds nothing yet.
    started: asyncio.Future[asyncio.Task[None]] = loop.create_future()
    listening = asyncio.create_task(_listen(reader, follower, started), name="edge-listener")
    following: asyncio.Task[None] | None = None
    try:
        first: set[asyncio.Future[Any]] = {listening, started}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if started.done():
            following = started.result()
            await asyncio.wait({listening, following}, return_when=asyncio.FIRST_COMPLETED)
        if not listening.done():  # the follower stopped (SIGTERM): nothing more to hear
            listening.cancel()
        else:
            listening.result()  # what the listener raised, raised here
        if following is not None:
            await following
    finally:
        if not listening.done():
            listening.cancel()
        await store.close()
        await inbox.close()
        writer.close()
        os.close(lock)


async def _listen(reader: asyncio.StreamReader, follower: InboxFollower,
                  started: asyncio.Future[asyncio.Task[None]]) -> None:
    """What the edge sends, until it says stop or is gone: translations to keep, and wakes
    (the first starts the follower, handed to `started`). One task for the worker's life:
    a task and a wait for each frame were ~5 % of the worker's event loop."""
    loop = asyncio.get_running_loop()
    while True:
        item = await receive(reader)
        if item is None or item[0] == "stop":  # stopped, or the edge is gone
            follower.stop()
            return
        if item[0] == "keep":
            # A translator's translation for an ACK, for when its row comes up.
            follower.keep(item[1], item[2])
            continue
        if not started.done():
            loop.add_signal_handler(signal.SIGTERM, follower.stop)
            started.set_result(asyncio.create_task(follower.follow(), name="inbox-follower"))
        follower.wake()


def _keep_out_of_collections() -> None:
    """What start-up made (tables, the translator, the search registry, modules) lives as
    long as the process: the cyclic collector's full passes need not walk it again (they
    took ~130 ms each, 1.2 s of the worker's 15 s over `bench/apply_lag.py`; 0.8 s after;
    the rest is the translations kept for a backlog)."""
    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
