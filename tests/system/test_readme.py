"""The README stays true: its tour runs, its layout tree matches the tree, its links resolve.

The tour test stands in for a reader on a fresh clone: a temp directory holding the
repository's `examples/` and a `.venv/bin/isthmus` that runs this checkout, a real
`isthmus serve` on 127.0.0.1 (the reader's `make run`), and the shell blocks the README
marks `<!-- tour -->` run as written, in order. The only change made to them is the
ports: the README's 2575 and 8080 become the gateway's ephemeral ones. A block marked
`<!-- tour: serve -->` is the reader restarting `make run`; the test restarts its gateway
with the environment that block sets.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GatewayProcess

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"

# A marker comment, then (after blank lines) a fenced block.
MARKED_BLOCK = re.compile(
    r"<!-- (?P<marker>[a-z]+(?::\s*[a-z]+)?) -->\s*\n```[a-z]*\n(?P<body>.*?)```", re.S)
MLLP_PORT, HTTP_PORT = "2575", "8080"
BLOCK_TIMEOUT = 120.0
START_TIMEOUT = 30.0


def marked_blocks(marker_prefix: str) -> list[tuple[str, str]]:
    """(marker, body) of every README block whose marker starts with `marker_prefix`."""
    return [(m["marker"].replace(" ", ""), m["body"])
            for m in MARKED_BLOCK.finditer(README.read_text(encoding="utf-8"))
            if m["marker"].startswith(marker_prefix)]


# -- the tour ---------------------------------------------------------------------------


def _fresh_clone(root: Path) -> dict[str, str]:
    """A directory laid out like a clone after `make run`; the environment to run in it."""
    for name in ("examples", "mappings", "tests"):
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    shim = bin_dir / "isthmus"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m gateway "$@"\n')
    shim.chmod(0o755)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath}


def _start(data_dir: Path, env: dict[str, str]) -> GatewayProcess:
    """`isthmus serve` on ephemeral ports, killed if it is not listening in time."""
    process = GatewayProcess(data_dir, env=env)
    # GatewayProcess.start blocks on the listening line; the timer bounds that wait.
    timer = threading.Timer(START_TIMEOUT, process.kill)
    timer.start()
    try:
        return process.start(timeout=START_TIMEOUT)
    except BaseException:
        process.kill()
        raise
    finally:
        timer.cancel()


def _restart_env(block: str, root: Path) -> dict[str, str]:
    """The variables a `VAR=value ... make run` block sets (paths made absolute)."""
    words = shlex.split(" ".join(line.split("#", 1)[0] for line in block.splitlines()))
    assert words[-2:] == ["make", "run"], f"a tour: serve block must end in `make run`: {block!r}"
    env: dict[str, str] = {}
    for word in words[:-2]:
        name, sep, value = word.partition("=")
        assert sep and name.isidentifier(), f"not VAR=value before make run: {word!r}"
        env[name] = str(root / value) if (root / value).exists() else value
    return env


def _with_ports(block: str, gateway: GatewayProcess) -> str:
    """The block with the README's ports replaced by the running gateway's."""
    for line in block.splitlines():
        # Without an explicit port a command would talk to whatever holds 2575/8080.
        if re.search(r"\bisthmus send\b", line):
            assert f"--port {MLLP_PORT}" in line, f"tour `isthmus send` without --port: {line}"
        if re.search(r"\bcurl\b", line):
            assert f":{HTTP_PORT}" in line, f"tour curl without :{HTTP_PORT}: {line}"
    block = re.sub(rf"\b{MLLP_PORT}\b", str(gateway.mllp_port), block)
    return re.sub(rf"\b{HTTP_PORT}\b", str(gateway.http_port), block)


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[tuple[Path, list[GatewayProcess]]]:
    root = tmp_path / "clone"
    root.mkdir()
    started: list[GatewayProcess] = []
    yield root, started
    for process in started:
        process.kill()


@pytest.mark.slow
def test_readme_tour_runs_as_written_against_a_real_gateway(
        clone: tuple[Path, list[GatewayProcess]]) -> None:
    root, started = clone
    env = _fresh_clone(root)
    blocks = marked_blocks("tour")
    assert sum(marker == "tour" for marker, _ in blocks) >= 3, "the README lost its tour"
    assert any(marker == "tour:serve" for marker, _ in blocks), "the tour never reads FHIR"

    started.append(_start(root / "var", {"PYTHONPATH": env["PYTHONPATH"]}))
    outputs: list[str] = []
    for marker, block in blocks:
        gateway = started[-1]
        if marker == "tour:serve":
            assert gateway.terminate() == 0
            started.append(_start(root / "var", {"PYTHONPATH": env["PYTHONPATH"],
                                                 **_restart_env(block, root)}))
            continue
        assert marker == "tour", f"unknown tour marker {marker!r}"
        script = _with_ports(block, gateway)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=root, env=env,
                                capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
        assert result.returncode == 0, (
            f"README tour block failed (exit {result.returncode}):\n{block}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")
        outputs.append(result.stdout)

    # What the tour's comments promise the reader.
    assert "CTRL-ADT-0001 AA" in outputs[0]
    assert "status: applied" in outputs[0] or "status: translated" in outputs[0]
    assert '"resourceType":"Bundle"' in outputs[-1] and "MRN-100001" in outputs[-1]
    assert started[-1].terminate() == 0


# -- the layout tree --------------------------------------------------------------------


def layout_paths() -> list[str]:
    """Every path the README's layout tree names (directories end in '/')."""
    (block,) = [body for _, body in marked_blocks("layout")]
    paths: list[str] = []
    stack: list[str] = []
    for line in block.splitlines():
        match = re.match(r"^(?P<indent> *)(?P<name>\S+)(?:\s{2,}.*)?$", line)
        assert match, f"layout line is not 'name  description': {line!r}"
        depth = len(match["indent"]) // 2
        assert depth <= len(stack), f"layout line indented too deep: {line!r}"
        del stack[depth:]
        path = "".join(stack) + match["name"]
        paths.append(path)
        if path.endswith("/"):
            stack.append(match["name"])
    return paths


def test_readme_layout_tree_matches_the_repository() -> None:
    paths = layout_paths()
    missing = [p for p in paths
               if not ((REPO / p).is_dir() if p.endswith("/") else (REPO / p).is_file())]
    packages = sorted(f"gateway/{d.name}/" for d in (REPO / "gateway").iterdir()
                      if (d / "__init__.py").is_file())
    unlisted = [p for p in packages if p not in paths]
    assert not missing, f"README layout names paths that do not exist: {missing}"
    assert not unlisted, f"gateway/ subpackages missing from the README layout: {unlisted}"


# -- links ------------------------------------------------------------------------------


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def _anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def _documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_every_relative_link_in_readme_and_docs_resolves() -> None:
    broken = []
    for document in _documents():
        text = document.read_text(encoding="utf-8")
        for match in LINK.finditer(text):
            target = match["target"]
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            if not resolved.exists():
                broken.append(f"{document.relative_to(REPO)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{document.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_hold_the_reference_the_readme_points_to() -> None:
    for name in ("architecture", "configuration", "fhir-api", "forwarding", "audit",
                 "operations", "mappings"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200
