"""The audit log as the gateway and its tools open it: keys from the settings, the file."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from opentelemetry import metrics

from gateway.app.files import KEYS_DIR
from gateway.audit.keys import SIGNING_KEY_FILE, AuditKeyError, AuditKeys, load_keys
from gateway.audit.log import AUDIT_FILE, AuditLog
from gateway.audit.publish import FilePublisher, HttpWitness, Publisher
from gateway.config import Settings
from gateway.store.pg.audit import PgAuditStore

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
                    "see docs/audit.md", " and ".join(p.name for p in generated),
                    directory)
    return keys


async def open_audit(settings: Settings, meter: metrics.Meter | None = None, *,
                     gateway: bool = True, pool: object | None = None) -> AuditLog:
    """The audit log in the data dir, or (`pool`, store.backend = "postgresql") in the
    database: the gateway's (signing checkpoints, publishing them, checking the store
    against those published before) or a tool's."""
    audit = settings.audit
    try:
        # On PostgreSQL every instance extends one chain: they must share the keys, so
        # none is generated (an instance's own would not verify the others' records).
        keys = audit_keys(settings, create=gateway and pool is None)
    except AuditKeyError as exc:
        if pool is None:
            raise
        raise AuditKeyError(
            f"{exc}: with store.backend = \"postgresql\" every instance needs the same "
            "audit keys: set audit.key_file or ISTHMUS_AUDIT__KEYS, and "
            "audit.signing_key_file or ISTHMUS_AUDIT__SIGNING_KEY (docs/deployment.md)"
        ) from None
    publishers: list[Publisher] = []
    if gateway:
        _warn_key_beside_data(settings)
        publishers = checkpoint_publishers(settings)
    server = f"{settings.telemetry.service_name}@{socket.gethostname()}"
    if pool is not None:
        return await AuditLog.open_store(
            await PgAuditStore.open(pool, audit.max_batch), keys,
            checkpoint_interval=audit.checkpoint_interval,
            checkpoint_every=audit.checkpoint_every, server=server, meter=meter,
            checkpoints=gateway, publishers=publishers)
    return await AuditLog.open(
        settings.store.data_dir / AUDIT_FILE, keys,
        synchronous=settings.store.synchronous, max_batch=audit.max_batch,
        checkpoint_interval=audit.checkpoint_interval,
        checkpoint_every=audit.checkpoint_every,
        server=f"{settings.telemetry.service_name}@{socket.gethostname()}",
        meter=meter, checkpoints=gateway, publishers=publishers)


def checkpoint_publishers(settings: Settings) -> list[Publisher]:
    """Where signed checkpoints go besides the store, as configured (checked writable)."""
    audit = settings.audit
    publishers: list[Publisher] = []
    if audit.checkpoint_publish is not None:
        published = FilePublisher(audit.checkpoint_publish)
        published.check()
        if _inside(audit.checkpoint_publish, settings.store.data_dir):
            log.warning("audit.checkpoint_publish %s is inside the data dir: a rollback of "
                        "the data dir takes it along; put it on another mount",
                        audit.checkpoint_publish)
        publishers.append(published)
    if audit.witness_url is not None:
        publishers.append(HttpWitness(audit.witness_url, audit.witness_timeout))
    return publishers


def signing_key_path(settings: Settings) -> Path | None:
    """The signing key's file (None: given inline, e.g. from a secret store)."""
    audit = settings.audit
    if audit.signing_key is not None:
        return None
    return audit.signing_key_file or settings.store.data_dir / KEYS_DIR / SIGNING_KEY_FILE


def _warn_key_beside_data(settings: Settings) -> None:
    """Whoever can rewrite audit.db and read a key kept beside it can cut the tail and sign
    the shorter log: only heads published elsewhere would still show it."""
    path = signing_key_path(settings)
    if path is None or not _inside(path, settings.store.data_dir):
        return
    anchored = (settings.audit.checkpoint_publish is not None
                and not _inside(settings.audit.checkpoint_publish, settings.store.data_dir)
                ) or settings.audit.witness_url is not None
    log.warning(
        "the audit signing key %s is inside the data dir: anyone who can change audit.db "
        "there can also re-sign a truncated or rolled-back trail. Keep it on another mount "
        "(audit.signing_key_file) or in a secret store (ISTHMUS_AUDIT__SIGNING_KEY)%s; see "
        "docs/audit.md, Rollback and truncation", path,
        "" if anchored else ", and publish checkpoints outside it "
        "(audit.checkpoint_publish, audit.witness_url)")


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())
