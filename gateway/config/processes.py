"""Settings of the process layout: how many worker processes apply the inbox, and the
memory the MLLP edge may hold between receiving a message and its commit."""

from __future__ import annotations

import os

from pydantic import Field

from gateway.config.base import Section as _Section


def default_workers() -> int:
    """One apply worker per core beside the edge's; none on a single core (the edge
    applies in its own process there, where a second process would only take turns)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return max(0, cores - 1)


class ProcessesConfig(_Section):
    # Worker processes that apply committed inbox rows to the FHIR store (each takes the
    # patients whose key falls in its share); with them run max(1, (N+1)//2) translator
    # processes for the ACKs. None: one per core but the edge's. 0: the edge process
    # translates and applies itself.
    workers: int | None = Field(default=None, ge=0, le=64)
    # Bytes of frames the edge holds from a frame's first byte to its ACK (receiving,
    # translating, waiting for the group commit; a whole frame counts twice, for the copy
    # each stage makes). Full: no connection is read until answered frames give bytes
    # back; a frame that cannot be held is answered AR ("resend later"). The apply worker
    # reads its batches within a quarter of it.
    memory_budget_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    # Frames at least this large are parsed, checked and translated off the edge's event
    # loop, so one heavy message cannot hold up other connections' ACKs or /healthz.
    offload_bytes: int = Field(default=64 * 1024, ge=0)

    def worker_count(self) -> int:
        return default_workers() if self.workers is None else self.workers
