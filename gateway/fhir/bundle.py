"""Canonical Translation to a FHIR R4 transaction Bundle, and Bundle JSON bytes.

Each primary resource is a conditional update on its business identifier
(`PUT Patient?identifier=system|value`), so a resend updates instead of duplicating;
resources only referred to (a Practitioner from an XCN) are created if absent
(`ifNoneExist`), so a message never overwrites a richer record with its fragment; a
resource without a usable identifier is PUT at its deterministic id. A Provenance entry
names the source message.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from gateway.canonical import Provenance, Translation
from gateway.canonical.ids import name_uuid
from gateway.fhir import jsonio
from gateway.fhir.escaping import escape_value

Json = dict[str, Any]

PROVENANCE_SENDER_SYSTEM = "urn:isthmus:hl7v2:sender"
PROVENANCE_MESSAGE_SYSTEM = "urn:isthmus:hl7v2:control-id"
_SAFE = "/:@!$'()*,;=.-_~"  # what may stay unescaped in a search value (not & + # |)
# A value made only of what `quote` leaves as is (most systems and MRNs) is its own quoting.
_UNQUOTED = re.compile(r"[A-Za-z0-9/:@!$'()*,;=._~-]*")
_SEARCH_SPECIAL = frozenset("\\,|$")  # what a search value escapes (escape_value)


def to_bundle(translation: Translation) -> Json:
    entries: list[Json] = []
    targets: list[Json] = []  # the Provenance's: every resource of the Bundle
    # The entries written out here, in one loop with the Provenance's targets: this runs
    # for every resource of every message.
    for resource in translation.resources:
        resource_type = resource.resource_type
        resource_id = resource.id
        full_url = "urn:uuid:" + resource_id
        key = resource.key
        if key is not None and (system := key[0]):
            value = key[1]
            quoted = _QUOTED.get(system) or _quoted(system)
            search = f"identifier={quoted}|{_QUOTED.get(value) or _quoted(value)}"
            if resource.primary:
                request = {"method": "PUT", "url": f"{resource_type}?{search}"}
            else:
                request = {"method": "POST", "url": resource_type, "ifNoneExist": search}
            body: Json = {"resourceType": resource_type, **resource.content}
        else:
            request = {"method": "PUT", "url": f"{resource_type}/{resource_id}"}
            body = {"resourceType": resource_type, "id": resource_id, **resource.content}
        entries.append({"fullUrl": full_url, "resource": body, "request": request})
        targets.append({"reference": full_url})
    entries.append(_provenance_entry(translation.provenance, targets))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def dumps(document: Json, pretty: bool = False) -> bytes:
    return jsonio.dumps(document, pretty=pretty)


def _quote(text: str) -> str:
    """`text` as one token part of a search URL: escaped as a search value (a "," or "|" in
    an MRN must not split it into two values: the conditional update would name another
    record), then percent-quoted."""
    if _SEARCH_SPECIAL.isdisjoint(text) and _UNQUOTED.fullmatch(text):
        return text
    return quote(escape_value(text), _SAFE)


# Identifier systems and values as quoted, across messages: a sender uses a few systems, in
# every message, and names the same doctors, wards and patients again (a value's check
# cost ~2k instructions, a look-up ~100). Bounded, as both come from the messages.
_QUOTED: dict[str, str] = {}


def _quoted(text: str) -> str:
    quoted = _quote(text)
    if len(text) <= 512:
        if len(_QUOTED) >= 4096:
            _QUOTED.clear()
        _QUOTED[text] = quoted
    return quoted


def _provenance_entry(source: Provenance, targets: list[Json]) -> Json:
    """The Provenance's entry."""
    provenance = provenance_resource(source, targets)
    provenance_id = provenance["id"]
    return {"fullUrl": "urn:uuid:" + provenance_id, "resource": provenance,
            "request": {"method": "PUT", "url": f"Provenance/{provenance_id}"}}


def provenance_id(source: Provenance) -> str:
    """The id of the Provenance naming a message. PUT at an id derived from the message:
    applying the same message again (a crash between commit and apply) rewrites the same
    Provenance instead of adding one, and finds it there."""
    return name_uuid(f"Provenance|{source.source_application}|"
                     f"{source.source_facility}|{source.control_id}")


def provenance_resource(source: Provenance, targets: list[Json]) -> Json:
    """The Provenance naming the source message and `targets` (a reference to each
    resource of the message)."""
    application, facility, _, _, received_at, _ = source
    recorded = _recorded(received_at)
    sender = f"{application}^{facility}".strip("^ ") or "unknown"
    provenance: Json = {
        "resourceType": "Provenance",
        "id": provenance_id(source),
        "target": targets,
        "recorded": recorded,
        "activity": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
            "code": "UPDATE"}]},
        "agent": [{
            "type": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                "code": "author"}]},
            "who": {"identifier": {"system": PROVENANCE_SENDER_SYSTEM, "value": sender},
                    "display": sender},
        }],
        "entity": [{"role": "source", "what": _source_message(source)}],
    }
    return provenance


def _source_message(source: Provenance) -> Json:
    what: Json = {"display": source.message_type or "HL7 v2 message"}
    # MSH-10 is required, yet some senders leave it empty.
    if control_id := source.control_id.strip():
        what["identifier"] = {"system": PROVENANCE_MESSAGE_SYSTEM, "value": control_id}
    return what


# A UTC time's ".mmm+00:00" by its millisecond, and the latest second written out.
_MILLIS = [f".{millis:03d}+00:00" for millis in range(1000)]
_second: tuple[tuple[int, ...], str] = ((), "")


def _recorded(at: datetime) -> str:
    """`at.isoformat(timespec="milliseconds")`, ~3x cheaper for a UTC time: isoformat
    cost ~13k instructions (1 % of an ADT^A01), and messages come many a second."""
    global _second
    if at.tzinfo is not UTC:
        return at.isoformat(timespec="milliseconds")
    second = (at.second, at.minute, at.hour, at.day, at.month, at.year)
    kept = _second  # read once: another thread may replace it
    if second != kept[0]:
        kept = _second = (second, at.isoformat(timespec="seconds")[:19])
    return kept[1] + _MILLIS[at.microsecond // 1000]
