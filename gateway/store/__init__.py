"""Persistence behind small interfaces: the inbox, the audit log; later outbox and FHIR store."""

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
from gateway.store.inbox import InboundMessage, InboxEntry, SqliteInbox, Stored

__all__ = ["AuditFilter", "AuditRow", "AuditStore", "CheckpointRow", "InboundMessage",
           "InboxEntry", "SqliteAuditStore", "SqliteFhirStore", "SqliteInbox", "StoreError",
           "StoreUnavailable", "Stored", "StoredAuditRow", "WriteConflict"]
