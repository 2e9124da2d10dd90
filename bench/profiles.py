"""Sampling profiles of a running gateway's processes, for the benchmarks' `--profile`.

py-spy (a dev dependency) samples each process (the edge and its children: translators,
apply workers, the large-frame process) 100 times a second while the load runs, and stops
at `stop()`. It samples only the thread holding the interpreter lock (`--gil`): on this
machine py-spy cannot tell a thread waiting (in epoll, a queue, a socket read) from one
running, so without it every waiting thread would count as busy. What runs without the lock
(SQLite, compression, hashing of large buffers) is then not in the samples: the report sets
the samples against the CPU time the process used (from /proc), and the rest is that.

Printed per process: its CPU seconds and the share of them spent in Python, then the
functions by own time (on top of the stack) and by total time (anywhere on it, the
gateway's functions only), each as a share of the process's CPU time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

PY_SPY = Path(sys.executable).with_name("py-spy")
_ROLES = ((b"translator_main", "translator"), (b"worker_main", "worker"),
          (b"spawn_main", "large frames"))
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def gateway_processes(pid: int) -> list[tuple[str, int]]:
    """(role, pid) of the gateway process `pid` and of its children that run our code."""
    found = [("edge", pid)]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        role = next((name for marker, name in _ROLES if marker in argv), None)
        if role is not None:
            found.append((f"{role} {child}", int(child)))
    return found


class Profiles:
    """py-spy recording every process of one gateway until `stop`."""

    def __init__(self, processes: list[tuple[str, int]]) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="isthmus-profiles-"))
        self._runs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        self._cpu = {role: (pid, cpu_seconds(pid)) for role, pid in processes}
        for role, pid in processes:
            out = self._dir / f"{pid}.txt"
            argv = [str(PY_SPY), "record", "--pid", str(pid), "--gil", "--function",
                    "--format", "raw", "--output", str(out)]
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self._runs.append((role, out, spy))

    def stop(self, top: int = 10) -> str:
        """Stops recording; the report, one block a process."""
        blocks = []
        for role, out, spy in self._runs:
            spy.send_signal(signal.SIGINT)
            try:
                _, err = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                err = b"py-spy did not stop"
            if not out.exists():
                blocks.append(f"profile  {role}: none ({err.decode(errors='replace')[-200:]})")
                continue
            pid, before = self._cpu[role]
            blocks.append(_report(role, out.read_text(), cpu_seconds(pid) - before, top))
            out.unlink()
        os.rmdir(self._dir)
        return "\n".join(blocks)


def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of one process, from /proc (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _report(role: str, raw: str, cpu: float, top: int) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_name(frame) for frame in stack.split(";")]
        own[frames[-1]] += count
        for name in set(frames):
            if name.startswith(("gateway/", "<gateway")):
                total[name] += count
    # A sample is 10 ms of the lock held: as a share of the CPU time used.
    whole = max(cpu * 100, samples, 1)
    lines = [f"profile  {role}: {cpu:.2f} s CPU, {samples / whole:.0%} of it in Python "
             f"({samples} samples with the lock held, 100 a second)"]
    if not samples:
        return lines[0]
    lines.append("  own time")
    lines += [f"    {count / whole:6.1%}  {name}" for name, count in own.most_common(top)]
    lines.append("  total time (the gateway's functions)")
    lines += [f"    {count / whole:6.1%}  {name}" for name, count in total.most_common(top)]
    return "\n".join(lines)


def _name(frame: str) -> str:
    """`function (path:line)` as `module/path.py:function`, the path from the package on."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for anchor in ("/gateway/", "/site-packages/", "/lib/python3"):
        if anchor in path:
            path = path[path.index(anchor) + 1:]
            if anchor == "/site-packages/":
                path = path.removeprefix("site-packages/")
            break
    return f"{path}:{match['function']}"
