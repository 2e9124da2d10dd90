"""The container's edges (issue 19, item 9): what the build context holds, and a health
check that follows the configured HTTP port."""

from __future__ import annotations

import fnmatch
import socket
from pathlib import Path

from conftest import RunningGateway
from support.cli import isthmus

ROOT = Path(__file__).resolve().parents[2]


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: patterns in order, the last that matches decides, `!` re-includes.

    A pattern also matches everything under a directory it matches."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        candidates = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(prefix, p) for prefix in prefixes for p in candidates) or \
                (pattern.startswith("**/") and any(
                    fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)):
            excluded = not negate
    return excluded


def test_build_context_leaves_out_data_keys_and_environments() -> None:
    for secret in ("var/inbox.db", "var/keys/audit-signing.pem", "var/fhir.db-wal",
                   ".venv/bin/python", ".git/config", "tests/messages/adt_a01.hl7",
                   "bench/var/x.db", "server.key", "gateway/__pycache__/app.cpython-311.pyc"):
        assert _dockerignore_excludes(secret), secret
    for needed in ("pyproject.toml", "README.md", "gateway/__init__.py",
                   "gateway/cli/serve.py", "mappings/messages/ADT_A01.csv"):
        assert not _dockerignore_excludes(needed), needed


def test_the_image_health_check_runs_isthmus_health() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    check = dockerfile.split("HEALTHCHECK", 1)[1].split("\n\n", 1)[0]
    assert '"isthmus", "health"' in check
    assert "8080" not in check


async def test_health_follows_the_configured_http_port(gateway: RunningGateway) -> None:
    port = gateway.http_url.rsplit(":", 1)[1]
    code, out, err = await isthmus("health", env={"ISTHMUS_SERVER__HTTP_PORT": port})
    assert code == 0, err
    assert out.startswith("ready (") and f":{port}/readyz" in out


async def test_health_with_nothing_listening_fails_in_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = await isthmus("health", "--timeout", "2",
                                   env={"ISTHMUS_SERVER__HTTP_PORT": str(port)})
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and f":{port}/readyz" in err
    assert "Traceback" not in err
