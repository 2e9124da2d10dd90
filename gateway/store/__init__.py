"""Persistence behind small interfaces: the inbox with its dedup keys and outbox rows, the
local FHIR store and the audit log; aiosqlite (WAL, group commit) implements them."""

from gateway.store.audit import (
    AuditFilter,
    AuditRow,
    AuditStore,
    CheckpointRow,
    SqliteAuditStore,
    StoredAuditRow,
)
from gateway.store.errors import StoreUnavailable
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.inbox import InboundMessage, InboxEntry, SqliteInbox, Stored

__all__ = ["AuditFilter", "AuditRow", "AuditStore", "CheckpointRow", "InboundMessage",
           "InboxEntry", "SqliteAuditStore", "StoreUnavailable", "Stored", "StoredAuditRow",
           "SqliteInbox",
           "SqliteFhirStore"]
