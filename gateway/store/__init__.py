"""Persistence behind small interfaces: the inbox with its dedup keys and outbox rows, the
local FHIR store and the audit log; aiosqlite (WAL, group commit) implements them."""

from gateway.store.audit import (
    AuditFilter,
    AuditRow,
    AuditStore,
    CheckpointRow,
    StoredAuditRow,
)
from gateway.store.audit_sqlite import SqliteAuditStore
from gateway.store.errors import StoreError, StoreUnavailable, WriteConflict
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.inbox import InboundMessage, Inbox, InboxEntry, Replayed, Stored
from gateway.store.inbox_sqlite import SqliteInbox

__all__ = ["AuditFilter", "AuditRow", "AuditStore", "CheckpointRow", "InboundMessage",
           "Inbox", "InboxEntry", "Replayed", "SqliteAuditStore", "SqliteFhirStore",
           "SqliteInbox", "StoreError", "StoreUnavailable", "Stored", "StoredAuditRow",
           "WriteConflict"]
