"""Settings of encryption at rest: the data keys that seal PHI in the stores."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr, field_validator

from gateway.config.base import Section as _Section


class EncryptionConfig(_Section):
    # New data dirs are sealed (AES-256-GCM); a data dir made before keeps working as it
    # is until `isthmus store encrypt` migrates it. false: new data dirs stay plaintext.
    enabled: bool = True
    # The data keys, like the audit's: a key file, or the keys themselves (e.g.
    # ISTHMUS_ENCRYPTION__KEYS="id:base64,id:base64"). Neither: <data_dir>/keys/, generated.
    key_file: Path | None = None
    keys: SecretStr | None = None

    @field_validator("key_file")
    @classmethod
    def _file_present(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a readable file")
        return path
