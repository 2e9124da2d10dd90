"""The audit trail: append-only, hash-chained records of every PHI access.

Callers describe an access with an `AuditRecord` (`record`) and submit it to the
`AuditLog` (`log`); the access is granted only once the record is durable (fail closed).
PHI inside records is encrypted (AES-256-GCM); checkpoints are signed (Ed25519); exports
are FHIR AuditEvents (IHE BALP) or CSV that verify offline with the public key. Each is
imported from its own module: the ingest path reads a message's patient (`patient`)
without the log and its publisher.
"""
