"""The stores on PostgreSQL, for several gateway instances sharing one database: the
schema and its migrations (`schema`, `migrate`), the pool (`connect`), the inbox, the
outbox, the FHIR store (the embedded store's planner and writer in PostgreSQL's dialect,
`dialect`), the audit trail and the used assertion ids."""
