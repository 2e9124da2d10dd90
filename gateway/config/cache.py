"""Where the gateway keeps what it can compute again: the FHIR model's answers the table
checks need (`gateway.fhir.model_cache`) and the mapping tables compiled to Python source
(`gateway.mapping.codegen`, one file per table set, named by its hash), shared by every
start on this account."""

from __future__ import annotations

import os
from pathlib import Path

FACTS_FILE = "fhir-model-facts.json"
TABLES_FOLDER = "compiled-tables"


def facts_file() -> Path | None:
    """`$XDG_CACHE_HOME/isthmus/…` or `~/.cache/isthmus/…`; None without a home."""
    base = os.environ.get("XDG_CACHE_HOME")
    try:
        root = Path(base) if base else Path.home() / ".cache"
    except RuntimeError:  # no home directory to be found
        return None
    return root / "isthmus" / FACTS_FILE


def compiled_tables_dir() -> Path | None:
    """`$XDG_CACHE_HOME/isthmus/compiled-tables` or `~/.cache/…`; None without a home."""
    facts = facts_file()
    return facts.parent / TABLES_FOLDER if facts is not None else None
