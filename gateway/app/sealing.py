"""The stores' data keys as the settings name them, and the codec a data dir is opened with."""

from __future__ import annotations

from gateway.app.state import FHIR_FILE, INBOX_FILE, KEYS_DIR
from gateway.config import Settings
from gateway.store.data_keys import KEY_FILE, KeySource, open_codec
from gateway.store.sealing import RowCodec


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
    return open_codec(data_dir, key_source(settings), enabled=settings.encryption.enabled,
                      databases=(data_dir / INBOX_FILE, data_dir / FHIR_FILE), create=create)
