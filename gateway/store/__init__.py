"""Persistence behind small interfaces: the inbox (this issue), later outbox and FHIR store."""

from gateway.store.errors import StoreUnavailable
from gateway.store.inbox import InboundMessage, InboxEntry, SqliteInbox, Stored

__all__ = ["InboundMessage", "InboxEntry", "SqliteInbox", "StoreUnavailable", "Stored"]
