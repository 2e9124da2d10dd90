"""The `isthmus` command as a child process, awaited without blocking the test's loop."""

from __future__ import annotations

import asyncio
import os
import sys


async def isthmus(*args: str, env: dict[str, str] | None = None,
                  timeout: float = 30) -> tuple[int, str, str]:
    """Run `python -m gateway ARGS` without blocking the event loop that serves the gateway."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
