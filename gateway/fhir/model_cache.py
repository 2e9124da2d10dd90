"""The FHIR model's answers kept in a file between runs (what `model.py` reads from the
fhir.resources models: which names are types and resources, each element's type, a
resource's top-level elements).

Reading them from the models imports pydantic classes, seconds at every start of
`isthmus translate` or `isthmus serve`; the answers never change for one version of
fhir.resources and of our own reading of it. So they are kept in a JSON file stamped with
both: a file with another stamp (an upgrade, an edited model.py or bindings.py) is
ignored and written afresh. A file that cannot be read or written costs only the time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_SOURCES = ("model.py", "bindings.py", "model_cache.py")


def _stamp() -> str:
    """fhir.resources' version and a hash of the code that reads the models."""
    digest = hashlib.sha256()
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        digest.update(importlib.metadata.version("fhir.resources").encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        with contextlib.suppress(OSError):
            digest.update((here / name).read_bytes())
    return digest.hexdigest()[:32]


class Facts:
    """Answers by key ('resource:Patient', 'type:HumanName', 'element:Patient.name',
    'elements:Patient')."""

    def __init__(self) -> None:
        self._known: dict[str, Any] = {}
        self._new = False

    def get(self, key: str) -> Any:
        return self._known.get(key)

    def note(self, key: str, value: Any) -> None:
        self._known[key] = value
        self._new = True

    def load(self, path: Path) -> None:
        """Take the answers kept in `path` (nothing if it is absent, unreadable or stale)."""
        try:
            kept = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return
        if isinstance(kept, dict) and kept.get("stamp") == _stamp():
            answers = kept.get("facts")
            if isinstance(answers, dict):
                self._known = {**answers, **self._known}

    @contextlib.contextmanager
    def kept_in(self, path: Path | None) -> Iterator[None]:
        """The answers of `path` taken before the block, and any new ones written back
        after it (not when it raises); None: neither."""
        if path is not None:
            self.load(path)
        yield
        if path is not None:
            self.save(path)

    def save(self, path: Path) -> None:
        """Write the answers to `path` if any were new (atomically; errors ignored)."""
        if not self._new:
            return
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".facts-")
            with os.fdopen(handle, "wb") as out:
                out.write(json.dumps({"stamp": _stamp(), "facts": self._known}).encode())
            os.replace(temporary, path)
            self._new = False


FACTS = Facts()
