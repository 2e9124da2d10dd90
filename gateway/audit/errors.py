"""Errors of the audit layer: one root, `AuditError`, under every one of them.

Messages name a source, a filter or a record number, never a key or a value from a
record. Classes that were born as ValueError keep that base too.
"""

from __future__ import annotations


class AuditError(Exception):
    """The root of every error `gateway.audit` raises."""


class AuditIntegrityError(AuditError):
    """The log does not verify where it must (its tail, before signing or purging)."""


class AuditKeyError(AuditError):
    """Keys missing, unreadable or malformed; the message names the source, never a key."""


class QueryError(AuditError, ValueError):
    """A filter that cannot be used; names the filter, never echoes its value."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class ExportFormatError(AuditError, ValueError):
    """The file is not an audit export at all."""


class RevealError(AuditError):
    """The PHI of a record cannot be decrypted here (key missing or data altered)."""
