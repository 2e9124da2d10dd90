"""Compiled tables as Python source: generated once per table set, kept on disk by the
tables' hash, loaded instead of checking and compiling the tables at every start.

    emit.py    the compiler's closures, as they describe themselves, written as a module
    named.py   the module's shared objects (vocabularies, readers, converters...), named once
    paths.py   the statements that write a value at a FHIR path (setters written out)
    walk.py    a message map's walk over the segments, one function per segment id
    instances.py  what a table function being written knows of its repeating instances
               (held in local variables) and of the keys written so far
    source.py  the pieces of source it writes with (literals, keys, preludes)
    cache.py   the hash that names a table set, and the files kept under it
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import CodeType
from typing import TYPE_CHECKING, Any

from gateway.mapping.codegen.cache import cached_code, store, tables_key, writable
from gateway.mapping.steps import MessageFn
from gateway.mapping.tables import MergeRow, Where

if TYPE_CHECKING:
    from gateway.mapping.compiler import Compiled

log = logging.getLogger(__name__)

MODULE_NAME = "gateway.mapping.generated"


class Loaded:
    """What the translator runs: message functions by message type, and the merge rows."""

    def __init__(self, events: dict[str, MessageFn], merges: dict[str, MergeRow],
                 generated: bool) -> None:
        self.events = events
        self.merges = merges
        self.generated = generated  # False: the compiler's closures (the interpreter)


def load(directory: Path, site: Path | None, default_offset: str, cache_dir: Path | None,
         compile_tables: Callable[[], Compiled], *, in_memory: bool = False) -> Loaded:
    """The generated module for these tables: from `cache_dir` when it holds it, else
    compiled (`compile_tables`, which raises TableErrors) and generated, and kept there.

    When it cannot be kept (no cache, or one that cannot be written) the compiler's
    closures run instead, unless `in_memory`: compiling the source costs a few seconds
    that only a cached copy pays back."""
    key = tables_key(directory, site, default_offset) if cache_dir is not None else ""
    if cache_dir is not None:
        code = cached_code(cache_dir, key)
        if code is not None:
            return _run(code)
    compiled = compile_tables()
    source = generated_source(compiled, default_offset)
    if source is None:
        return Loaded(compiled.events, compiled.merges, generated=False)
    if not in_memory and (cache_dir is None or not writable(cache_dir)):
        log.warning("the compiled tables cannot be cached in %s: they run interpreted",
                    cache_dir)
        return Loaded(compiled.events, compiled.merges, generated=False)
    code = compile(source, f"<{MODULE_NAME}>", "exec")
    if cache_dir is not None:
        store(cache_dir, key, source, code)
    return _run(code)


def generated_source(compiled: Compiled, default_offset: str) -> str | None:
    """The module's source, or None (logged) when a construct cannot be generated."""
    from gateway.mapping.codegen.emit import generate
    from gateway.mapping.codegen.source import NotGenerated

    try:
        return generate(compiled.events, compiled.merges, compiled.vocabularies,
                        default_offset)
    except NotGenerated as exc:
        # A construct the generator does not know yet: the closures translate alike.
        log.warning("mapping tables run interpreted, not generated: %s", exc)
        return None


def _run(code: CodeType) -> Loaded:
    namespace: dict[str, Any] = {"__name__": MODULE_NAME}
    exec(code, namespace)  # noqa: S102 - our own generated source, from our own tables
    merges = {row[0]: MergeRow(Where(row[3], row[4]), row[0], row[1], row[2])
              for row in namespace["MERGES"]}
    return Loaded(dict(namespace["EVENTS"]), merges, generated=True)
