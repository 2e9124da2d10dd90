"""What a test of the apply path opens: the shipped tables and search registry, and an
inbox and a FHIR store in a temp dir (the caller closes both stores)."""

from __future__ import annotations

from pathlib import Path

from gateway.fhir.search import TABLE, SearchRegistry
from gateway.mapping.engine import Translator
from gateway.mapping.tables import SHIPPED
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.inbox_sqlite import SqliteInbox


async def open_apply_parts(directory: Path
                           ) -> tuple[SearchRegistry, Translator, SqliteInbox, SqliteFhirStore]:
    registry = SearchRegistry.load(SHIPPED / TABLE)
    translator = Translator.load(SHIPPED)
    inbox = await SqliteInbox.open(directory / "inbox.db", synchronous="normal")
    store = await SqliteFhirStore.open(directory / "fhir.db", registry.index,
                                       synchronous="normal")
    return registry, translator, inbox, store
