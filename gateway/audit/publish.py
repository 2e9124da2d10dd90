"""Publishing signed checkpoints outside the audit database, where a rollback of the data
directory cannot reach them: an append-only file or a directory (another mount, a WORM
volume, `chattr +a`), and an HTTP witness that keeps what it is sent.

Each publisher gets the signed checkpoint as one line (`anchor.published_line`). A failure
to publish never stops the audit trail (the checkpoint is in the store and in the log
line); it is logged and counted, and the next checkpoint publishes a newer head.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Protocol

import aiohttp
from yarl import URL

from gateway.audit.anchor import PUBLISHED_SUFFIX, Head, read_heads
from gateway.audit.errors import AuditError


class PublishError(AuditError):
    """A checkpoint could not be published; names the target, never a record."""


class Publisher(Protocol):
    """Somewhere a signed checkpoint is sent as it is signed."""

    @property
    def name(self) -> str: ...

    async def publish(self, line: bytes, log_id: str, count: int) -> None: ...

    async def close(self) -> None: ...


class FilePublisher:
    """Appends each checkpoint to a file, or writes it as a file of its own in a
    directory (for mounts that allow creating files but not changing them)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    @property
    def name(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    def check(self) -> None:
        """At start: the target exists or can be made, and can be written."""
        target = self._path if self._path.is_dir() else self._path.parent
        if not target.is_dir():
            raise PublishError(f"audit.checkpoint_publish: {target} is not a directory")
        if not os.access(target if self._path.is_dir() or not self._path.exists()
                         else self._path, os.W_OK):
            raise PublishError(f"audit.checkpoint_publish: {self._path} is not writable")

    def heads(self, log_id: str | None = None) -> list[Head]:
        """The heads published so far (none if nothing was published yet); with `log_id`
        in a directory, only the newest file of that log is read (names sort by count)."""
        if not self._path.exists():
            return []
        if log_id is not None and self._path.is_dir():
            files = sorted(self._path.glob(f"{log_id}-*{PUBLISHED_SUFFIX}"))
            return read_heads(files[-1]) if files else []
        return read_heads(self._path)

    async def publish(self, line: bytes, log_id: str, count: int) -> None:
        await asyncio.to_thread(self._write, line, log_id, count)

    def _write(self, line: bytes, log_id: str, count: int) -> None:
        if self._path.is_dir():
            path = self._path / f"{log_id}-{count:012d}{PUBLISHED_SUFFIX}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        else:
            path, flags = self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            return  # this checkpoint was published already (a close right after a sign)
        except OSError as exc:
            raise PublishError(f"{path}: {exc.strerror or exc}") from None
        try:
            # One write of one line under O_APPEND: lines from two writers never interleave.
            os.write(fd, line)
            os.fsync(fd)
        except OSError as exc:
            raise PublishError(f"{path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    async def close(self) -> None:
        return None


class HttpWitness:
    """POSTs each checkpoint (application/json) to a URL that keeps what it is sent."""

    def __init__(self, url: str, timeout: float) -> None:
        self._url = url
        # Named in logs without credentials or a query that could carry a token.
        self._name = str(URL(url).with_user(None).with_query(None).with_fragment(None))
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return self._name

    async def publish(self, line: bytes, log_id: str, count: int) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(
                    self._url, data=line, headers={"Content-Type": "application/json"}
                    ) as response:
                if response.status >= 300:
                    raise PublishError(f"witness {self._name}: HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PublishError(f"witness {self._name}: {type(exc).__name__}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
