"""Persistence behind small interfaces: the inbox with its dedup keys and outbox rows, the
local FHIR store and the audit log; aiosqlite (WAL, group commit) implements them. Each is
imported from its own module (`inbox`, `inbox_sqlite`, `fhir_sqlite`, `audit`...): a
process that opens none of them imports none."""
