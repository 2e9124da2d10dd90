"""The event catalogue: `<resource type in lower case>.<created|updated|deleted>`."""

from __future__ import annotations

from collections.abc import Iterable

ACTIONS = ("created", "updated", "deleted")


def event_name(resource_type: str, action: str) -> str:
    return f"{resource_type.lower()}.{action}"


def unknown_events(events: Iterable[str], types: Iterable[str]) -> list[str]:
    """The events whose type is not one the store keeps (the search table's types)."""
    known = {t.lower() for t in types}
    return [e for e in events if e.partition(".")[0] not in known]
