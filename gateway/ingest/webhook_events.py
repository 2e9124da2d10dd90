"""Reading a backend's change notification: which event it is and which resource changed.

A backend's `webhook` settings name the event id and the resource with JSON pointers
(RFC 6901) or a URL template whose `{/pointer}` parts are filled from the event; a shape
table (mappings/webhooks/<shape>.csv) does the same per kind of event, so a platform's
`appointment.created` or `patient.updated` maps onto a FHIR read without code. Pure: no
I/O but reading the table at start-up. Errors name the pointer or the row, never a value
from the event (it may carry PHI).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.fhir.model import is_resource_type
from gateway.mapping.errors import TableError
from gateway.mapping.tables import WEBHOOKS_FOLDER, Where, records

FOLDER = WEBHOOKS_FOLDER
COLUMNS = ("when", "event_id", "resource", "resource_type", "event", "note")
IGNORE = "ignore"  # a row's event: accepted (answered 202) and nothing fetched
DEFAULT_KIND = "resource.changed"
# RFC 6901.
_POINTER = re.compile(r"(/([^~/]|~[01])*)+")
_PLACEHOLDER = re.compile(r"\{(/[^{}]*)\}")
# FHIR R4 §2.1.0.1 (id): 1-64 of A-Z a-z 0-9 - .
_REFERENCE = re.compile(r"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9.-]{1,64})")
_EVENT_ID = re.compile(r"[\x21-\x7e]{1,200}")
_KIND = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_NAME = re.compile(r"[a-z0-9_-]{1,32}")


class MalformedEvent(Exception):
    """An event that cannot be read: the reason names a pointer or a rule, not a value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ChangedResource:
    """What one event says: its id (for dedup), its kind, and the resource to fetch."""

    event_id: str
    kind: str
    resource_type: str
    id: str

    @property
    def path(self) -> str:
        return f"{self.resource_type}/{self.id}"


@dataclass(frozen=True, slots=True)
class Rule:
    """One way to read an event: when it applies, and where its id and resource are."""

    when: tuple[str, str] | None  # (pointer, value); None: every event
    event_id: str
    resource: str  # a pointer or a URL template
    resource_type: str  # "" any
    event: str  # the kind, or IGNORE
    line: int = 0

    def matches(self, document: Any) -> bool:
        if self.when is None:
            return True
        value = resolve(document, self.when[0])
        return isinstance(value, str | int) and not isinstance(value, bool) and (
            str(value) == self.when[1])


@dataclass(frozen=True, slots=True)
class EventReader:
    """The rules of one backend, tried in order; the first that matches reads the event."""

    rules: tuple[Rule, ...]
    base_url: str

    def read(self, document: Any) -> ChangedResource | None:
        """The changed resource; None for an event a rule says to ignore."""
        if not isinstance(document, dict):
            raise MalformedEvent("the event is not a JSON object")
        for rule in self.rules:
            if rule.matches(document):
                return self._read(rule, document)
        raise MalformedEvent("no rule of this backend's webhook reads this kind of event")

    def _read(self, rule: Rule, document: dict[str, Any]) -> ChangedResource | None:
        event_id = _scalar(document, rule.event_id)
        if event_id is None or not _EVENT_ID.fullmatch(event_id):
            raise MalformedEvent(f"no event id at {rule.event_id} (1-200 printable "
                                 "characters)")
        if rule.event == IGNORE:
            return None
        reference = (fill(rule.resource, document) if "{" in rule.resource
                     else _reference_at(document, rule.resource))
        resource_type, id = self._local(reference, rule.resource)
        if rule.resource_type and resource_type != rule.resource_type:
            raise MalformedEvent(f"the resource at {rule.resource} is not a "
                                 f"{rule.resource_type}")
        return ChangedResource(event_id, rule.event or DEFAULT_KIND, resource_type, id)

    def _local(self, reference: str, where: str) -> tuple[str, str]:
        """'Type/id' from a relative reference or an absolute URL on the backend's base
        (a version suffix dropped: the current version is fetched)."""
        base = self.base_url.rstrip("/")
        if reference.startswith(("http://", "https://")):
            if not reference.startswith(base + "/") or urlsplit(reference).query:
                raise MalformedEvent(f"the resource at {where} is not on this backend")
            reference = reference[len(base) + 1:]
        reference = reference.split("/_history/", 1)[0]
        found = _REFERENCE.fullmatch(reference)
        if found is None or not is_resource_type(found.group(1)):
            raise MalformedEvent(f"the resource at {where} is not a FHIR reference "
                                 "(Type/id)")
        return found.group(1), found.group(2)


def resolve(document: Any, pointer: str) -> Any:
    """The value at a JSON pointer (RFC 6901), or None when there is none."""
    node = document
    for raw in pointer.split("/")[1:]:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(token)
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
        if node is None:
            return None
    return node


def fill(template: str, document: Any) -> str:
    """A URL template with each `{/pointer}` replaced by the event's value there (an id:
    letters, digits, '-' and '.', so nothing can change the path's shape)."""

    def value(found: re.Match[str]) -> str:
        text = _scalar(document, found.group(1))
        if text is None or not re.fullmatch(r"[A-Za-z0-9.-]{1,64}", text):
            raise MalformedEvent(f"no id at {found.group(1)} (1-64 of A-Z a-z 0-9 - .)")
        return text

    return _PLACEHOLDER.sub(value, template)


def _scalar(document: Any, pointer: str) -> str | None:
    value = resolve(document, pointer)
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value)


def _reference_at(document: Any, pointer: str) -> str:
    value = resolve(document, pointer)
    if isinstance(value, dict):  # a FHIR Reference
        value = value.get("reference")
    if not isinstance(value, str):
        raise MalformedEvent(f"no resource reference at {pointer}")
    return value


# -- the tables ----------------------------------------------------------------------------


def shape_table(name: str, shipped_dir: Path, site_dir: Path | None = None) -> Path:
    """The file of shape `name`: the site's copy if it has one, else the shipped."""
    if site_dir is not None and (site_dir / FOLDER / f"{name}.csv").is_file():
        return site_dir / FOLDER / f"{name}.csv"
    return shipped_dir / FOLDER / f"{name}.csv"


def load_shape(name: str, shipped_dir: Path, site_dir: Path | None = None) -> tuple[Rule, ...]:
    """The rows of a shape table, checked: a bad row stops the start (file:line: reason)."""
    path = shape_table(name, shipped_dir, site_dir)
    if not _NAME.fullmatch(name) or not path.is_file():
        raise TableError(path, 0, f"no webhook shape '{name}' (looked in {FOLDER}/ of the "
                                  "shipped and site tables)")
    rules = tuple(_rule(where, row) for where, row in records(path, COLUMNS))
    if not rules:
        raise TableError(path, 1, "has no rows")
    return rules


def load_shapes(shipped_dir: Path, site_dir: Path | None = None) -> dict[str, int]:
    """Every shape table, shipped or the site's, checked: name -> rows."""
    names = {p.stem for d in (shipped_dir, site_dir) if d is not None
             for p in (d / FOLDER).glob("*.csv")}
    return {name: len(load_shape(name, shipped_dir, site_dir)) for name in sorted(names)}


def direct_rule(event_id: str, resource: str) -> Rule:
    """The rule of a backend's own `event_id` and `resource` settings (every event)."""
    return Rule(None, event_id, resource, "", "", 0)


def reader(rules: Iterable[Rule], base_url: str) -> EventReader:
    return EventReader(tuple(rules), base_url)


def _rule(where: Where, row: dict[str, str]) -> Rule:
    when: tuple[str, str] | None = None
    if row["when"]:
        pointer, equals, value = row["when"].partition("=")
        if not equals or not _POINTER.fullmatch(pointer) or not value:
            raise where.error("when is /pointer=value (or empty: every event)")
        when = (pointer, value)
    if not _POINTER.fullmatch(row["event_id"]):
        raise where.error("event_id is a JSON pointer such as /id")
    event = row["event"]
    if not _KIND.fullmatch(event):
        raise where.error("event is a kind such as appointment.created, or ignore")
    resource, resource_type = row["resource"], row["resource_type"]
    if event != IGNORE:
        if not (_POINTER.fullmatch(resource) or _PLACEHOLDER.search(resource)):
            raise where.error("resource is a JSON pointer or a template with {/pointer}")
        if resource_type and not is_resource_type(resource_type):
            raise where.error(f"resource_type '{resource_type}' is not a FHIR R4 "
                              "resource type")
    return Rule(when, row["event_id"], resource, resource_type, event, where.line)
