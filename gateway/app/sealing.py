"""The stores' data keys as the settings name them, and the codec a data dir is opened with."""

from __future__ import annotations

import logging

from gateway.app.files import FHIR_FILE, INBOX_FILE, KEYS_DIR
from gateway.config import Settings
from gateway.store.data_keys import KEY_FILE, KeySource, open_codec
from gateway.store.sealing import RowCodec

log = logging.getLogger(__name__)


def key_source(settings: Settings) -> KeySource:
    encryption = settings.encryption
    return KeySource(
        default_file=settings.store.data_dir / KEYS_DIR / KEY_FILE,
        key_file=encryption.key_file,
        keys_text=encryption.keys.get_secret_value() if encryption.keys else None)


def store_codec(settings: Settings, *, create: bool = False) -> RowCodec:
    """How the data dir's stores seal and open PHI. `create` (serve only): a new data dir
    gets keys (generated when none are configured) and its marker. Raises SealError, one
    line, when a key the data dir needs is missing or wrong."""
    data_dir = settings.store.data_dir
    source = key_source(settings)
    codec = open_codec(data_dir, source, enabled=settings.encryption.enabled,
                       databases=(data_dir / INBOX_FILE, data_dir / FHIR_FILE), create=create)
    if create and codec.sealed and source.keys_text is None and (
            source.key_file or source.default_file).resolve().is_relative_to(
                data_dir.resolve()):
        log.warning("the store data keys %s are inside the data dir: a copy of the data dir "
                    "carries the keys that open it. Keep them on another mount "
                    "(encryption.key_file) or in a secret store (ISTHMUS_ENCRYPTION__KEYS); "
                    "see docs/encryption.md", source.key_file or source.default_file)
    return codec
