"""Operators' accesses to stored messages, on record in the audit trail before they
happen; and who the operator is (user and host) for those records."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from typing import TYPE_CHECKING

from gateway.cli.shared import audit_settings, database_pool

if TYPE_CHECKING:
    from gateway.audit.record import AuditRecord


def who() -> tuple[str, str]:
    """(user, host) of the operator running the command."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return user, socket.gethostname()


def message_access(action: str, inbox_id: int, raw: bytes, control_id: str = "",
                   outcome: str = "success") -> AuditRecord:
    """The record of an operator's access to a stored message (the patient from PID-3)."""
    from gateway.audit.patient import reference_from_v2
    from gateway.audit.record import Action, AuditRecord
    from gateway.hl7.message import parse_message

    try:
        patient = reference_from_v2(parse_message(raw))
    except Exception:  # noqa: BLE001 - a stored message that does not parse has no patient
        patient = None
    user, host = who()
    return AuditRecord(Action(action), "success" if outcome == "translated" else outcome,
                       client_id="isthmus-cli", user=user, peer=host,
                       resource_type="hl7v2-message", resource_id=str(inbox_id),
                       control_id=control_id, patient=patient)


def record_accesses(args: argparse.Namespace, records: list[AuditRecord]) -> str | None:
    """Record operator accesses before they happen; the reason when that is not possible."""
    from gateway.app.audit import open_audit
    from gateway.audit.keys import AuditKeyError
    from gateway.audit.log import AuditIntegrityError
    from gateway.store.errors import StoreUnavailable

    settings = audit_settings(args)
    if not settings.audit.enabled or not records:
        return None

    async def record() -> None:
        async with database_pool(settings) as pool:
            audit = await open_audit(settings, gateway=False, pool=pool)
            try:
                for future in [audit.submit(r) for r in records]:
                    await future
            finally:
                await audit.close()

    try:
        asyncio.run(record())
    except (AuditKeyError, AuditIntegrityError, StoreUnavailable, sqlite3.Error,
            OSError) as exc:
        reason = exc if isinstance(exc, AuditKeyError) else type(exc).__name__
        return f"the access could not be recorded in the audit trail ({reason})"
    return None
