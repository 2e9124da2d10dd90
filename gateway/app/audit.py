"""The audit log as the gateway and its tools open it: keys from the settings, the file."""

from __future__ import annotations

import logging
import socket

from opentelemetry import metrics

from gateway.app.state import KEYS_DIR
from gateway.audit import AUDIT_FILE, AuditKeys, AuditLog, load_keys
from gateway.config import Settings

log = logging.getLogger(__name__)


def audit_keys(settings: Settings, *, create: bool = False,
               need_data_keys: bool = True) -> AuditKeys:
    """The audit keys the settings name; `create` (serve only) generates missing defaults."""
    audit = settings.audit
    directory = settings.store.data_dir / KEYS_DIR
    keys, generated = load_keys(
        default_dir=directory,
        key_file=audit.key_file,
        keys_text=audit.keys.get_secret_value() if audit.keys else None,
        signing_key_file=audit.signing_key_file,
        signing_key_text=audit.signing_key.get_secret_value() if audit.signing_key else None,
        trusted_public_key_files=audit.trusted_public_key_files,
        create=create, need_data_keys=need_data_keys)
    if generated:
        log.warning("no audit keys configured: generated %s in %s (owner-only). Keep a copy "
                    "apart from the data, or set audit.key_file and audit.signing_key_file; "
                    "see README, Audit trail", " and ".join(p.name for p in generated),
                    directory)
    return keys


async def open_audit(settings: Settings, meter: metrics.Meter | None = None, *,
                     gateway: bool = True) -> AuditLog:
    """The audit log in the data dir: the gateway's (signing checkpoints) or a tool's."""
    audit = settings.audit
    return await AuditLog.open(
        settings.store.data_dir / AUDIT_FILE, audit_keys(settings, create=gateway),
        synchronous=settings.store.synchronous, max_batch=audit.max_batch,
        checkpoint_interval=audit.checkpoint_interval,
        checkpoint_every=audit.checkpoint_every,
        server=f"{settings.telemetry.service_name}@{socket.gethostname()}",
        meter=meter, checkpoints=gateway)
