"""What every child process of the edge does first (apply workers, translators).

Each is `python -m gateway.app.<role>_main FD INDEX ...`, started by the edge
(`gateway.app.workers`), never by hand: it dies with the edge, leaves Ctrl-C to it, reads
its settings (pickled) on stdin and logs through the same PHI filter.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import sys

from gateway.app.memory import return_large_buffers
from gateway.config import Settings

_PR_SET_PDEATHSIG = 1


def begin(role: str, index: int, parent: int) -> Settings:
    """Set the process up as the edge's child `role`-`index`; its settings."""
    die_with(parent)
    # Ctrl-C reaches the whole process group: the edge decides when its children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Until it serves, a child holds nothing: SIGTERM (the edge stopping during our start)
    # ends it at once instead of after the tables have loaded.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    settings: Settings = pickle.load(sys.stdin.buffer)  # from our own parent
    os.umask(0o077)
    return_large_buffers()  # a heavy message's buffers go back to the system
    from gateway.policy.redact import install

    logging.basicConfig(stream=sys.stderr, level=settings.log.level.upper(),
                        format=f"%(asctime)s %(levelname)s {role}-{index} %(name)s: "
                               "%(message)s")
    install()  # every log line through the PHI filter, as in the edge
    return settings


def die_with(parent: int) -> None:
    """Linux: the kernel kills this process when the edge dies (even by SIGKILL), so a
    restarted gateway never finds an old child still at work."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the signal was set
        os._exit(1)
