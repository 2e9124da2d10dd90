"""Where the gateway keeps what it can compute again: the FHIR model's answers the table
checks need (`gateway.fhir.model_cache`), shared by every start on this account."""

from __future__ import annotations

import os
from pathlib import Path

FACTS_FILE = "fhir-model-facts.json"


def facts_file() -> Path | None:
    """`$XDG_CACHE_HOME/isthmus/…` or `~/.cache/isthmus/…`; None without a home."""
    base = os.environ.get("XDG_CACHE_HOME")
    try:
        root = Path(base) if base else Path.home() / ".cache"
    except RuntimeError:  # no home directory to be found
        return None
    return root / "isthmus" / FACTS_FILE
