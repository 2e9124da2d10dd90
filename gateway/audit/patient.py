"""Patient references in the audit trail: read from HL7 v2, matched, shown as FHIR.

One text form for every source, so a reviewer's `--patient` finds them all:
`Patient/<id>` for a FHIR resource and `<assigning authority>|<identifier>` for an
identifier (PID-3 CX.4 and CX.1; the first '|' separates them). A bare identifier
(`MRN-100001`) matches it under any authority.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.hl7.escape import unescape
from gateway.hl7.message import Message

_OID = re.compile(r"[0-2](?:\.\d+)+")


def reference_from_v2(message: Message) -> str | None:
    """The patient of an HL7 v2 message: PID-3, first repetition, as 'AUTHORITY|ID'.

    One terser read of the repetition (CX), split here: CX.1 the identifier, CX.4 the
    assigning authority (HD.1, else HD.2).
    """
    try:
        cx = message.get_raw("PID-3(1)")
        if not cx:
            return None
        d = message.delimiters
        components = cx.split(d.component)
        value = components[0].split(d.subcomponent, 1)[0]
        if not value:
            return None
        hd = components[3].split(d.subcomponent) if len(components) > 3 else [""]
        authority = hd[0] or (hd[1] if len(hd) > 1 else "")
        if d.escape and d.escape in value + authority:
            value = unescape(value, d, message.charset)
            authority = unescape(authority, d, message.charset)
    except Exception:  # noqa: BLE001 - refused input may be malformed in any way
        # A reference that cannot be read is left out, never guessed; the record of the
        # access is written all the same.
        return None
    return f"{authority}|{value}"


def identifier_part(reference: str) -> str:
    """What a bare identifier search compares: the id after 'Patient/' or after '|'."""
    if reference.startswith("Patient/"):
        return reference[len("Patient/"):]
    authority, bar, value = reference.partition("|")
    return value if bar else authority


def is_bare(reference: str) -> bool:
    """A reviewer's search term without an authority or resource type."""
    return not reference.startswith("Patient/") and "|" not in reference


def fhir_reference(reference: str) -> dict[str, Any]:
    """A FHIR Reference(Patient) for a decrypted patient reference."""
    if reference.startswith("Patient/"):
        return {"reference": reference, "type": "Patient"}
    authority, bar, value = reference.partition("|")
    if not bar:  # a bare identifier, as a reviewer may search for one
        authority, value = "", reference
    identifier: dict[str, Any] = {"value": value}
    if _OID.fullmatch(authority):
        identifier["system"] = f"urn:oid:{authority}"
    elif ":" in authority:
        identifier["system"] = authority
    elif authority:
        identifier["assigner"] = {"display": authority}
    return {"type": "Patient", "identifier": identifier}
