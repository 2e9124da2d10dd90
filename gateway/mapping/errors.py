"""What can go wrong with a table (at start-up) and with a message (per translation)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gateway.hl7.location import Location, error_location


class MappingError(ValueError):
    """The root of everything the mapping layer raises (a ValueError, as each always was)."""


class TableError(MappingError):
    """A table that cannot be used: names the file, the line and the reason."""

    def __init__(self, file: Path | str, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}")
        self.file = str(file)
        self.line = line
        self.reason = reason


class TableErrors(MappingError):
    """Every problem found in a set of tables, so that one check run shows them all."""

    def __init__(self, errors: list[TableError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


class TranslationError(MappingError):
    """A message that cannot be translated, naming where (e.g. PID-7) and why.

    `location` is the text the tables name (a v2 position, or a FHIR element path going
    the other way); `v2_location` is the same place parsed, for an ERR segment. `str()`
    quotes the offending value, for the operator at a terminal; `safe_text` does not, for
    ACKs, logs and spans, which must never carry PHI.
    """

    def __init__(self, location: str, reason: str, value: str | None = None) -> None:
        shown = f"'{value}' {reason}" if value is not None else reason
        super().__init__(f"{location}: {shown}" if location else shown)
        self.location = location
        self.reason = reason
        self.value = value
        self.sequence = 1  # which occurrence of the segment (OBX[3]), set by the engine

    @property
    def v2_location(self) -> Location | None:
        """The v2 position with the segment's occurrence (OBX[3]-5); None for none."""
        found = error_location(self.location)  # parsed once per text, not per error
        if found is None or self.sequence == found.sequence:
            return found
        return replace(found, sequence=self.sequence)

    @property
    def where(self) -> str:
        """The location with the segment's occurrence when it is not the first: OBX[3]-5."""
        if self.sequence > 1 and "-" in self.location:
            segment, _, rest = self.location.partition("-")
            return f"{segment}[{self.sequence}]-{rest}"
        return self.location

    def __str__(self) -> str:
        shown = f"'{self.value}' {self.reason}" if self.value is not None else self.reason
        return f"{self.where}: {shown}" if self.location else shown

    @property
    def safe_text(self) -> str:
        return f"{self.where}: value {self.reason}" if self.value is not None else (
            f"{self.where}: {self.reason}" if self.location else self.reason)


class ConditionError(MappingError):
    """A condition that does not parse; the message says where."""


class ConversionError(MappingError):
    """A v2 value that has no faithful FHIR form. `reason` never quotes the value."""

    def __init__(self, reason: str, value: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.value = value


class UnsupportedMessage(TranslationError):
    """A message type no table maps."""

    def __init__(self, message_type: str) -> None:
        super().__init__("MSH-9", f"message type {message_type or '(empty)'} is not supported")
        self.message_type = message_type


class UnsupportedResource(TranslationError):
    """A FHIR resource (or Bundle) that no outbound table turns into an HL7 v2 message."""

    def __init__(self, resource_type: str, reason: str = "") -> None:
        super().__init__(
            "resourceType",
            reason or f"no HL7 v2 message is defined for resource type "
                      f"{resource_type or '(none)'}")
        self.resource_type = resource_type
