"""The people, organizations and coverage of one ADT (issue 14) applied to the local store:
the new resources (event Provenance, mother and insured RelatedPersons, Account, roles,
payer) are accepted in one transaction, and a resend finds them instead of adding more."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from conftest import message
from gateway.fhir.search import TABLE, SearchRegistry
from gateway.hl7.message import parse_message
from gateway.ingest.applier import LocalApplier
from gateway.mapping.engine import Translator
from gateway.mapping.tables import SHIPPED
from gateway.store.fhir import SearchQuery, TokenMatch
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.inbox import ACCEPTED, APPLIED, InboundMessage
from gateway.store.inbox_sqlite import SqliteInbox


async def test_people_message_applies_and_a_resend_updates(tmp_path: Path) -> None:
    registry = SearchRegistry.load(SHIPPED / TABLE)
    translator = Translator.load(SHIPPED)
    inbox = await SqliteInbox.open(tmp_path / "inbox.db", synchronous="normal")
    store = await SqliteFhirStore.open(tmp_path / "fhir.db", registry.index,
                                       synchronous="normal")
    applier = LocalApplier(store, registry, inbox, translator)
    raw = message("mapping_adt_people.hl7")
    try:
        applier.start()
        for attempt in ("first", "resend"):
            now = datetime.now(UTC)
            stored = await inbox.accept(InboundMessage(
                "SYNTHADT", "SYNTHHOSP", f"CTRL-PPL-0001-{attempt}", "ADT^A01", "2.8",
                "test", raw, b"ACK", now, status=ACCEPTED))
            applier.submit(stored.inbox_id, translator.translate(parse_message(raw), now))
            await applier.drain()
        assert {e.status for e in await inbox.list(10)} == {APPLIED}

        async def found(resource_type: str, value: str) -> int:
            page = await store.search(SearchQuery(resource_type, ((TokenMatch(
                "identifier", None, value),),)))
            return len(page.resources)

        assert await found("Account", "ACCT-400001") == 1
        assert await found("RelatedPerson", "MOM-77") == 1  # the mother (PID-21)
        assert await found("RelatedPerson", "MEM-987654") == 1  # the insured (IN1-49)
        assert await found("Coverage", "PMN-444D") == 1  # the member number (IN2-61)
    finally:
        await applier.close()
        await store.close()
        await inbox.close()
