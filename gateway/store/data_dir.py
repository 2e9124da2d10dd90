"""The data directory: owner-only, checked at start, and held by one gateway at a time.

It holds PHI (raw messages, FHIR resources, audit records in their SQLite files and
WAL/SHM files) and, by default, the keys beside them. So the directory is created 0700 and
every file 0600; a start refuses a directory that other users may open (and warns of a
file they could read were the directory opened); and an
exclusive `flock` on `DATA_DIR/.lock`, held for the gateway's lifetime, keeps a second
gateway off the same files (two writers would each batch and checkpoint as if alone). The
kernel drops the lock with the last descriptor, so a killed gateway leaves nothing to
clean up.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path

from gateway.store.errors import DataDirInUse, DataDirOpen

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
LOCK_FILE = ".lock"

# Mode bits a start refuses: any access by others, and group access unless the site lets
# a group read (a backup agent, say): then only group write and any access by others.
_FORBIDDEN = 0o077
_FORBIDDEN_GROUP_READ = 0o027


def read_key_text(path: Path, what: str) -> str:
    """A key file's text, warning (not refusing) when group or others may read it: a key
    file copied in by hand often keeps the copier's umask, and refusing would stop a
    restart in the middle of the night. `OSError` passes to the caller, who names it."""
    mode = path.stat().st_mode
    text = path.read_text()
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s file %s is readable by group or others (mode %o); chmod 600 it",
                    what, path, stat.S_IMODE(mode))
    return text


def private_dir(path: Path) -> None:
    """Create `path` (and missing parents) with the directory itself owner-only; an
    existing directory is left as it is (the start-up check judges it)."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)  # mkdir's mode is cut by the umask; this is not


def private_file(path: Path) -> None:
    """Create `path` empty and owner-only unless it exists. SQLite opens an empty file as
    an empty database and gives its -wal and -shm files the database file's mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def open_to_others(path: Path, *, allow_group_read: bool = False) -> list[tuple[Path, int]]:
    """The directory and the files and directories under it that other users (or the
    group, unless `allow_group_read`) may open, with their `st_mode`s."""
    forbidden = _FORBIDDEN_GROUP_READ if allow_group_read else _FORBIDDEN
    found: list[tuple[Path, int]] = []
    mode = path.stat().st_mode
    if mode & forbidden:
        found.append((path, mode))
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            entry = Path(root, name)
            try:
                mode = entry.stat().st_mode
            except FileNotFoundError:
                continue  # a WAL file removed as we looked
            if mode & forbidden:
                found.append((entry, mode))
    return found


class DataDirLock:
    """The exclusive lock on a data directory, held until `release` or process exit."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """Lock `data_dir` for this process, or raise DataDirInUse naming the holder."""
        path = data_dir / LOCK_FILE
        # Never deleted: removing a lock file lets two processes lock two different files.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise DataDirInUse(f"data dir {data_dir} is in use by another isthmus{pid}; "
                               "stop it first, or give this one another --data-dir"
                               ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd)

    def release(self) -> None:
        """Unlock (closing the descriptor drops the flock); safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim(data_dir: Path, *, allow_group_read: bool = False) -> DataDirLock:
    """Create the data directory owner-only, or check an existing one, then lock it for
    this process (DataDirInUse when another holds it).

    A directory (the data dir or one under it) others may open exposes what it holds now:
    DataDirOpen, the start is refused. A wide file inside owner-only directories is not
    readable by others today, only once a directory is opened or the file copied out with
    its mode: a warning naming it (a refusal would also stop a start for a note an
    operator saved there)."""
    private_dir(data_dir)
    # Locked first: beside a running gateway the answer is "in use", whatever the modes.
    lock = DataDirLock.acquire(data_dir)
    wide = open_to_others(data_dir, allow_group_read=allow_group_read)
    fix = "chmod -R g-w,o-rwx" if allow_group_read else "chmod -R go-rwx"
    directories = [(p, m) for p, m in wide if stat.S_ISDIR(m)]
    if directories:
        lock.release()
        raise DataDirOpen(f"data dir {data_dir} is open to other users: "
                          f"{_listed(directories)}; run `{fix} {data_dir}` (see "
                          "docs/operations.md, The data directory)")
    if wide:
        log.warning("data dir %s: files other users could read were the directory opened: "
                    "%s; run `%s %s`", data_dir, _listed(wide), fix, data_dir)
    return lock


def _listed(entries: list[tuple[Path, int]]) -> str:
    shown = ", ".join(f"{path} ({stat.S_IMODE(mode):04o})" for path, mode in entries[:3])
    return shown + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
