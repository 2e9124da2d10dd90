"""FHIR R4 -> HL7 v2, from the same tables as the forward translation.

`Reverser.load()` reads and checks every table (the forward checks and the outbound ones),
inverts the segment and data-type tables once (inverter.py), and `to_v2` turns a resource
or a Bundle into one message per top-level resource that has an outbound definition: a
resource another mapped resource refers to (the Patient of an Appointment, the Observations
of a DiagnosticReport) travels inside that one's message instead of in its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from gateway.hl7.delimiters import DEFAULT_DELIMITERS, Delimiters
from gateway.hl7.escape import escape
from gateway.mapping.compiler import compile_tables
from gateway.mapping.convert import Converters
from gateway.mapping.errors import TranslationError, UnsupportedResource
from gateway.mapping.tables import SHIPPED, read_tables
from gateway.mapping.to_v2.fhir_paths import Bundle
from gateway.mapping.to_v2.inverter import Inverter
from gateway.mapping.to_v2.outbound_tables import (
    COPY,
    Outbound,
    SegmentLayout,
    read_outbound,
    references,
)
from gateway.mapping.to_v2.tree import Tree, copy_tree, put, read, serialise

Json = dict[str, Any]

VERSION = "2.5.1"
PROCESSING_ID = "P"


class Reverser:
    """Compiled inverse tables and outbound definitions (thread-safe: no state per call)."""

    def __init__(self, inverter: Inverter, outbound: list[Outbound],
                 application: str = "ISTHMUS", facility: str = "GATEWAY",
                 delimiters: Delimiters = DEFAULT_DELIMITERS) -> None:
        self._inverter = inverter
        self._outbound = outbound
        self._by_type: dict[str, list[Outbound]] = {}
        for definition in outbound:
            self._by_type.setdefault(definition.resource, []).append(definition)
        self._application = application
        self._facility = facility
        self._d = delimiters
        self._escape = partial(escape, delimiters=delimiters)

    @classmethod
    def load(cls, directory: Path = SHIPPED, site: Path | None = None, *,
             application: str = "ISTHMUS", facility: str = "GATEWAY") -> Reverser:
        """Read, check and compile; raises TableErrors naming file:line."""
        tables = read_tables(directory, site)
        compiled = compile_tables(tables, Converters())
        outbound = read_outbound(directory, site, tables)
        inverter = Inverter(tables, compiled.vocabularies)
        for definition in outbound:
            for layout in definition.segments:
                if layout.map:
                    inverter.segment(layout.map)
        return cls(inverter, outbound, application, facility)

    @property
    def application(self) -> str:
        """MSH-3 of the messages made here (MSH-4: `facility`)."""
        return self._application

    @property
    def facility(self) -> str:
        return self._facility

    @property
    def message_types(self) -> dict[str, list[str]]:
        """Resource type -> the message types it can become (the default first)."""
        return {t: [d.message_type for d in sorted(ds, key=lambda d: not d.default)]
                for t, ds in sorted(self._by_type.items())}

    @property
    def skipped_rows(self) -> list[str]:
        """`file:line: reason` for each table row that is not read backwards."""
        return list(self._inverter.skipped)

    def to_v2(self, document: Json, *, event: str | None = None,
              control_id: str | None = None, now: datetime | None = None) -> list[str]:
        """One HL7 v2 message (CR-separated segments) per top-level mapped resource.

        `event` picks a message other than the default (`A28`, `ADT^A28`, `S14`, `O09`);
        `control_id` fixes MSH-10 (further messages get `-2`, `-3`, ...); `now` fixes MSH-7.
        """
        entries = _entries(document)
        bundle = Bundle(entries)
        mapped = [r for _, r in entries if r.get("resourceType") in self._by_type]
        if not mapped:
            kind = str(document.get("resourceType"))
            if kind == "Bundle":
                found = sorted({str(r.get("resourceType")) for _, r in entries})
                raise UnsupportedResource("Bundle", "the Bundle holds nothing that maps to "
                                          "HL7 v2 (it holds: " + (", ".join(found) or
                                                                   "no resources") + ")")
            raise UnsupportedResource(kind)
        inside = {id(t) for r in mapped for t in _referenced(r, bundle) if t is not r}
        top = [r for r in mapped if id(r) not in inside] or mapped[:1]
        # Of several top resources, one no row applies to (a ServiceRequest without a code,
        # as a VXU's ORC makes) is context, not a message; alone it is still refused.
        sendable = [r for r in top if self._applies(r, event)]
        top = sendable or top
        when = (now or datetime.now().astimezone())
        if when.tzinfo is None:
            when = when.astimezone()
        messages: list[str] = []
        for n, resource in enumerate(top, start=1):
            definition = self._definition(resource, event)
            ctl = (control_id if n == 1 else f"{control_id}-{n}") if control_id else \
                uuid.uuid4().hex[:20].upper()
            messages.append(self._message(definition, resource, bundle, ctl, when))
        return messages

    def _applies(self, resource: Json, event: str | None) -> bool:
        try:
            self._definition(resource, event)
        except UnsupportedResource:
            return False
        return True

    def _definition(self, resource: Json, event: str | None) -> Outbound:
        kind = str(resource.get("resourceType"))
        candidates = self._by_type[kind]
        if event:
            wanted = event.strip().upper()
            for definition in candidates:
                if wanted in (definition.message_type, definition.trigger):
                    return definition
            raise UnsupportedResource(kind, f"{kind} cannot become {event} (it can become "
                                      + ", ".join(d.message_type for d in candidates) + ")")
        for definition in candidates:
            if definition.default and (definition.condition is None or
                                       definition.condition(resource)):
                return definition
        raise UnsupportedResource(kind, f"no default HL7 v2 message for this {kind} "
                                  f"(name one of: "
                                  + ", ".join(d.message_type for d in candidates) + ")")

    # -- building the message ------------------------------------------------------------

    def _message(self, definition: Outbound, resource: Json, bundle: Bundle,
                 control_id: str, now: datetime) -> str:
        stamp = _dtm(now)
        values = {"{trigger}": definition.trigger, "{now}": stamp,
                  "{message_type}": definition.message_type}
        lines = [self._msh(definition, control_id, stamp)]
        taken = _taken(definition, resource, bundle)
        for layout in definition.segments:
            subjects = self._subjects(layout, resource, bundle, taken)
            for n, subject in enumerate(subjects, start=1):
                tree: Tree = {}
                if subject is not None:
                    tree = self._inverter.segment(layout.map).apply(subject, bundle)
                if layout.set_id and not read(tree, (layout.set_id,)):
                    put(tree, (layout.set_id, 1), str(n))
                if not tree and not layout.set_id and not layout.fixed:
                    continue  # an optional segment the resource says nothing for (RXR)
                for number, text in layout.fixed:
                    if read(tree, (number,)):
                        continue  # the resource said it: a fixed value only fills a gap
                    copied = COPY.fullmatch(text)
                    if copied is not None:  # {RXA-3}: the field's whole value, as written
                        found = tree.get(int(copied.group(2)))
                        if found is not None:
                            tree[number] = copy_tree(found) if isinstance(found, dict) \
                                else found
                        continue
                    for name, value in values.items():
                        text = text.replace(name, value)
                    put(tree, (number, 1), text)
                lines.append(self._segment(layout.segment, tree))
        return "\r".join(lines) + "\r"

    def _subjects(self, layout: SegmentLayout, resource: Json, bundle: Bundle,
                  taken: dict[str, list[Any]]) -> Iterator[Json | None]:
        if not layout.from_resource:
            yield None
            return
        if layout.each is not None:
            items = layout.each[0]
            for element in _each(layout.each, resource, bundle):
                yield {**resource, items: [element]}
            return
        if not layout.source:
            # What a per-element row writes (an AIP's participant) is its own segment's.
            yield {**resource, **{items: [e for e in resource.get(items, [])
                                          if not any(e is t for t in elements)]
                                  for items, elements in taken.items()}}
            return
        seen: set[int] = set()
        for reference in references(resource, layout.source):
            target = bundle.resolve(reference)
            if target is not None and target.get("resourceType") == layout.resource_type \
                    and id(target) not in seen:
                seen.add(id(target))
                yield target

    def _msh(self, definition: Outbound, control_id: str, stamp: str) -> str:
        d = self._d
        e = self._escape
        code, _, trigger = definition.message_type.partition("^")
        fields = ["MSH", d.encoding_characters, e(self._application), e(self._facility), "",
                  "", stamp, "", d.component.join((code, trigger, definition.structure)),
                  e(control_id), PROCESSING_ID, VERSION]
        return d.field.join(fields)

    def _segment(self, segment_id: str, tree: Tree) -> str:
        d = self._d
        seps = d.repetition + d.component + d.subcomponent
        top = max(tree, default=0)
        fields = [serialise(tree[f], seps, self._escape) if f in tree else ""
                  for f in range(1, top + 1)]
        return d.field.join([segment_id, *fields]).rstrip(d.field)


def _entries(document: Any) -> list[tuple[str, Json]]:
    if not isinstance(document, dict) or not isinstance(document.get("resourceType"), str):
        raise TranslationError("resourceType", "the input is not a FHIR resource (a JSON "
                                               "object with a resourceType)")
    if document["resourceType"] != "Bundle":
        return [("", document)]
    entries = document.get("entry", [])
    if not isinstance(entries, list):
        raise TranslationError("Bundle.entry", "is not a list")
    out: list[tuple[str, Json]] = []
    for n, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise TranslationError(f"Bundle.entry[{n}]", "has no resource")
        out.append((str(entry.get("fullUrl", "")), resource))
    return out


def _each(each: tuple[str, str, str], resource: Json, bundle: Bundle) -> Iterator[Any]:
    """The elements of a list whose reference (`actor`) is to the type named."""
    items, key, kind = each
    elements = resource.get(items)
    for element in elements if isinstance(elements, list) else []:
        if isinstance(element, dict):
            target = bundle.resolve(element.get(key))
            if target is not None and target.get("resourceType") == kind:
                yield element


def _taken(definition: Outbound, resource: Json, bundle: Bundle) -> dict[str, list[Any]]:
    """List name -> the elements per-element rows of the layout make segments of."""
    taken: dict[str, list[Any]] = {}
    for layout in definition.segments:
        if layout.each is not None:
            taken.setdefault(layout.each[0], []).extend(_each(layout.each, resource, bundle))
    return taken


def _referenced(resource: Json, bundle: Bundle) -> Iterator[Json]:
    """Every resource of the Bundle this one refers to (anywhere in it)."""
    stack: list[Any] = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("reference"), str):
                found = bundle.resolve(node)
                if found is not None:
                    yield found
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _dtm(when: datetime) -> str:
    """MSH-7: local time with its offset (v2.5.1 DTM), to the second."""
    return when.strftime("%Y%m%d%H%M%S") + when.strftime("%z")
