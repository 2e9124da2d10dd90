"""Giving the memory of large messages back to the system once they are gone.

glibc serves a large allocation (a multi-MB frame, its decoded text, its sealed copy) by
mapping pages of its own, and returns them when it is freed; but after the first such free
it raises that threshold to the freed size (up to 32 MB), so the next multi-MB buffers come
from the heap instead, whose top cannot shrink below a live small object. After a burst of
large messages the process then stays at its peak (issue 15: 2 GB after 80 messages of 10
MB). A fixed threshold keeps every large buffer mapped on its own, so RSS falls back once
the load drains. The edge sets it at start, and in the environment its child processes
(apply workers, the large-frame process) inherit, where glibc reads it before their
first allocation.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import sys
from collections.abc import Callable

# glibc's malloc.h. Setting either turns off the dynamic adjustment of both.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# A buffer this large or larger is mapped by itself. Above asyncio's read buffer (each
# socket read allocates 256 KiB, then shrinks it): below it, every read of every
# connection would map and unmap pages (glibc's starting value, 128 KiB, does that).
LARGE_BUFFER_BYTES = 1024 * 1024


def return_large_buffers() -> bool:
    """Fix the threshold at which allocations are mapped on their own, here and in the
    processes started from here; False where the C library has no such setting (not
    Linux, or not glibc): nothing changes there."""
    if not sys.platform.startswith("linux"):
        return False
    # Written, not read: for the children (an operator's own values are kept).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(LARGE_BUFFER_BYTES))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2 * LARGE_BUFFER_BYTES))
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # The trim threshold too: the adjustments made while the process started (large
    # files read and freed) left it at twice the largest, and the heap's free top is
    # given back only beyond it.
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, 2 * LARGE_BUFFER_BYTES))


def trim() -> bool:
    """Give the free pages inside the C heap back to the system (glibc's malloc_trim):
    what a burst of messages left between live objects; False where there is no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))


async def trim_after_bursts(held: Callable[[], int], interval: float = 1.0,
                            again_after: int = 5) -> None:
    """Trim whenever what the edge holds (`held`, bytes) has drained to nothing after a
    burst, and once more `again_after` intervals later if it is still drained: buffers
    the edge let go of just after the drain (a reply still being written, a commit's
    copy on a store thread, more likely on a busy machine) are given back too. A walk of
    the heap is a few ms, done only when there is something to give."""
    busy = False
    quiet = 0  # intervals drained since the last burst; -1 once both trims are done
    while True:
        await asyncio.sleep(interval)
        if held():
            busy, quiet = True, 0
            continue
        if busy:
            busy, quiet = False, 1
            trim()
        elif quiet > 0:
            quiet += 1
            if quiet > again_after:
                quiet = -1
                trim()
