"""What can go wrong with a table (at start-up) and with a message (per translation)."""

from __future__ import annotations

from pathlib import Path


class TableError(ValueError):
    """A table that cannot be used: names the file, the line and the reason."""

    def __init__(self, file: Path | str, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}")
        self.file = str(file)
        self.line = line
        self.reason = reason


class TableErrors(ValueError):
    """Every problem found in a set of tables, so that one check run shows them all."""

    def __init__(self, errors: list[TableError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


class TranslationError(ValueError):
    """A message that cannot be translated, naming where (e.g. PID-7) and why.

    `str()` quotes the offending value, for the operator at a terminal; `safe_text` does
    not, for ACKs, logs and spans, which must never carry PHI.
    """

    def __init__(self, location: str, reason: str, value: str | None = None) -> None:
        shown = f"'{value}' {reason}" if value is not None else reason
        super().__init__(f"{location}: {shown}" if location else shown)
        self.location = location
        self.reason = reason
        self.value = value

    @property
    def safe_text(self) -> str:
        return f"{self.location}: value {self.reason}" if self.value is not None else (
            f"{self.location}: {self.reason}" if self.location else self.reason)


class UnsupportedMessage(TranslationError):
    """A message type no table maps."""

    def __init__(self, message_type: str) -> None:
        super().__init__("MSH-9", f"message type {message_type or '(empty)'} is not supported")
        self.message_type = message_type
