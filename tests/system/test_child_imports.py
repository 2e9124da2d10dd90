"""The edge's children import what they use, not the edge's application.

Importing a child's module is most of its start (its tables load from the compiled cache in
~0.05 s). When a translator imported all of `gateway.app` (the aiohttp application, the
agent, the FHIR API, the console: ~1.1 s on a quiet machine, over 10 s on a loaded one),
the edge translated rows itself meanwhile and the apply workers translated every row
committed meanwhile a second time. Each child's module set is read in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What only the edge uses: its HTTP server and clients, the agent, the FHIR API and the
# console (`gateway.edge`), the supervisor of the children, telemetry, the audit log, the
# outbox, the token signing.
EDGE_ONLY = ("aiohttp", "opentelemetry", "asyncpg", "gateway.agent", "gateway.edge",
             "gateway.events.pump", "gateway.app.server", "gateway.app.resources",
             "gateway.app.specs", "gateway.app.state", "gateway.app.workers",
             "gateway.audit.log", "gateway.forward.outbox", "gateway.ingest.handler",
             "gateway.telemetry", "gateway.policy.jose", "cryptography.x509")
# What a process that applies nothing does not use either: the FHIR store, its search
# index and the sealing of stored rows.
APPLY_ONLY = ("aiosqlite", "cryptography", "gateway.store.fhir_sqlite",
              "gateway.store.inbox_sqlite", "gateway.fhir.search", "gateway.ingest.applier",
              "gateway.ingest.worker")


def _loaded(*modules: str, then: str = "", cache: Path | None = None) -> set[str]:
    """The modules a fresh interpreter holds after importing `modules` (and running
    `then`), its computed caches under `cache`."""
    code = ("import importlib, json, sys\n"
            f"for name in {list(modules)!r}:\n"
            "    importlib.import_module(name)\n"
            f"{then}\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if cache is not None:
        env["XDG_CACHE_HOME"] = str(cache)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          check=True, timeout=120)
    return set(json.loads(done.stdout))


def _within(loaded: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded
                  if any(m == p or m.startswith(p + ".") for p in packages))


@pytest.mark.parametrize(("child", "unused"), [
    # `child.begin` imports the PHI log filter once the child has its settings.
    (("gateway.app.translator_main", "gateway.policy.redact"), EDGE_ONLY + APPLY_ONLY),
    (("gateway.app.worker_main", "gateway.policy.redact"), EDGE_ONLY),
    # The large-frame process (multiprocessing's spawn): the command line's module again,
    # then the initializer's.
    (("gateway.__main__", "gateway.ingest.prepare"), EDGE_ONLY + APPLY_ONLY),
], ids=["translator", "apply-worker", "large-frame"])
def test_a_child_imports_none_of_what_only_the_edge_uses(
        child: tuple[str, ...], unused: tuple[str, ...]) -> None:
    loaded = _loaded(*child)
    assert "gateway.ingest.prepare" in loaded  # what every child runs
    assert _within(loaded, unused) == []


def test_the_edge_still_gets_its_application_from_one_module() -> None:
    loaded = _loaded("gateway.app.server")
    assert {"gateway.app.resources", "gateway.agent", "aiohttp.web"} <= loaded


def test_a_second_start_reads_the_search_table_without_the_fhir_model(tmp_path: Path) -> None:
    # Checking the search table reads the FHIR model's types and elements: from the
    # fhir.resources classes (pydantic models built at import, ~0.3 s of an apply
    # worker's start) the first time, from the kept answers after.
    start = ("from gateway.app.tables import load_translator, search_registry\n"
             "from gateway.config import load_settings\n"
             "settings = load_settings(None)\n"
             "load_translator(settings)\n"
             "assert search_registry(settings).types()\n")
    first = _loaded("gateway.app.worker_main", then=start, cache=tmp_path)
    second = _loaded("gateway.app.worker_main", then=start, cache=tmp_path)
    models = ("fhir.resources.R4B.patient", "fhir.resources.R4B.observation")
    assert set(models) <= first
    assert _within(second, ("fhir.resources.R4B",)) == ["fhir.resources.R4B"]
