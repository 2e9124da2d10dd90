"""The audit trail: append-only, hash-chained records of every PHI access.

Callers describe an access with an `AuditRecord` and submit it to the `AuditLog`; the
access is granted only once the record is durable (fail closed). PHI inside records is
encrypted (AES-256-GCM); checkpoints are signed (Ed25519); exports are FHIR AuditEvents
(IHE BALP) or CSV that verify offline with the public key.
"""

from gateway.audit.errors import AuditError
from gateway.audit.keys import AuditKeyError, AuditKeys, load_keys
from gateway.audit.log import AUDIT_FILE, AuditIntegrityError, AuditLog, verify_store
from gateway.audit.patient import reference_from_v2
from gateway.audit.query import AuditQuery, QueryError, build_query
from gateway.audit.record import SUCCESS, Action, AuditRecord
from gateway.audit.verify import Problem, Report

__all__ = [
    "AUDIT_FILE", "SUCCESS", "Action", "AuditError", "AuditIntegrityError", "AuditKeyError",
    "AuditKeys", "AuditLog", "AuditQuery", "AuditRecord", "Problem", "QueryError", "Report",
    "build_query", "load_keys", "reference_from_v2", "verify_store",
]
