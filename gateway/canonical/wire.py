"""A Translation as bytes, for the hop from the process that made it to the one applying
it (a translator's answer for an ACK, handed on by the edge to an apply worker, which
holds it until the message's inbox row comes up).

`encode` writes the provenance once and each resource as plain values (its type, id,
primary flag, business key's system and value, content) in one orjson document, zlib
level 1 over it; `decode` gives back an equal Translation, built as the engine builds
one (`trusted_resource`, one Provenance for all the resources). Against pickling the
models (as pydantic models, before they were plain classes), an ADT^A01 of 16 resources
(`bench/translation_wire.py`): 2.2 KB against 7.1 KB, read in ~43 us against ~51 (by the
apply worker, the end-to-end bottleneck), written in ~40 against ~40 (by a translator);
an ORU^R01 of 10 results, its Observations pickled (their Decimals), 2.4 KB against 8.7,
read in ~63 against ~64, written in ~80 against ~55. zlib is ~24 us of the writing and
~10 of the reading, for 3.3x fewer bytes: what lets a worker hold a long burst's
translations (`ingest/worker.py`, `KEPT_MAX`), and each one held is a row not translated
again (~1,850 us). Of the reading, orjson's parse is ~18 us and building the models
~12: without zlib it would be ~30 us, for 7.2 KB.

A content that JSON would not carry exactly (a Decimal, as FHIR decimals are: "1.10" must
stay "1.10"; a datetime; a subclass of str, int, dict or list; a dataclass) is pickled
instead, in a part after the document (an ORU^R01's Observations; the others stay JSON);
a Translation not made as the engine makes them (`_pickled_whole`) is pickled whole. The
engine's contents hold dicts with str keys, lists, str, int, bool and Decimal only (tests
pin every message of the corpus coming back equal); orjson would write a tuple, a UUID,
an Enum or a float NaN as something else without a word, so a content that may hold one
must not come here as JSON.

Both ends are the gateway's own processes, of one version: a form this code does not read
(another version's, bytes cut short or changed: zlib's checksum) is refused with
`WireFormError`, and the row is translated again (a kept translation is only a cache).
"""

from __future__ import annotations

import pickle
import struct
import zlib
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import orjson

from gateway.canonical.models import (
    BusinessKey,
    Provenance,
    Resource,
    Translation,
    key_of_pair,
    trusted_resource,
)

# The first byte: which form follows (a new form gets a new byte, refused by older code).
_DOCUMENT = b"J"  # zlib(the document's length, the document, pickled contents or nothing)
_PICKLED = b"P"  # zlib(the whole Translation pickled)
_LENGTH = struct.Struct(">I")
# Level 1: 3.3x fewer bytes for ~24 us; a smaller window or hash saved no time.
_LEVEL = 1
# Values orjson would write as something else go to `_refused` instead: datetimes (back as
# strings), subclasses of str, int, dict and list (their type lost), dataclasses.
_STRICT = (orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS
           | orjson.OPT_PASSTHROUGH_DATACLASS)

# (resource_type, id, primary, key system, key value, content) of one resource.
_Row = tuple[str, str, bool, str | None, str | None, Any]


class WireFormError(ValueError):
    """Bytes that are not a Translation in a form this code writes."""


def encode(translation: Translation) -> bytes:
    """The Translation as bytes that `decode` makes into an equal one."""
    rows = _rows(translation)
    if rows is None:
        return _pickled_whole(translation)
    source = translation.provenance
    head = (source.source_application, source.source_facility, source.control_id,
            source.message_type, source.received_at.isoformat(),
            source.last_updated.isoformat(), translation.unmapped, translation.z_segments)
    try:
        document = orjson.dumps((*head, rows), default=_refused, option=_STRICT)
        rest = b""
    except orjson.JSONEncodeError:
        # A content JSON does not carry (an ORU^R01's Decimals): those pickled, one by one.
        pickled: list[dict[str, Any]] = []
        split = [(*row[:5], _json_or_none(row[5], pickled)) for row in rows]
        try:
            document = orjson.dumps((*head, split), default=_refused, option=_STRICT)
        except orjson.JSONEncodeError:  # a field of another type than its model says
            return _pickled_whole(translation)
        rest = pickle.dumps(pickled, protocol=pickle.HIGHEST_PROTOCOL)
    return _DOCUMENT + zlib.compress(_LENGTH.pack(len(document)) + document + rest, _LEVEL)


def decode(data: bytes) -> Translation:
    """The Translation `encode` wrote; `WireFormError` for anything else."""
    try:
        body = zlib.decompress(memoryview(data)[1:])
        form = data[:1]
        if form == _DOCUMENT:
            return _built(body)
        if form != _PICKLED:
            raise ValueError("an unknown form")
        translation = pickle.loads(body)  # written by our own process (`encode`)
        if type(translation) is not Translation:
            raise TypeError(type(translation).__name__)
        return translation
    except Exception as exc:  # cut short, changed, another version's: say so, no values
        raise WireFormError(f"not a translation's wire form ({len(data)} bytes): "
                            f"{type(exc).__name__}") from exc


def _rows(translation: Translation) -> list[_Row] | None:
    """Each resource's plain values, or None when a record is not of the exact types the
    engine makes (a subclass may hold more than its fields: `_pickled_whole` then)."""
    source = translation.provenance
    if (type(translation) is not Translation or type(source) is not Provenance
            or not _exact_iso(source.received_at) or not _exact_iso(source.last_updated)):
        return None
    rows: list[_Row] = []
    append = rows.append
    for resource in translation.resources:
        if type(resource) is not Resource or resource.provenance is not source:
            return None
        key = resource.key
        if key is None:
            append((resource.resource_type, resource.id, resource.primary, None, None,
                    resource.content))
        elif type(key) is BusinessKey:
            append((resource.resource_type, resource.id, resource.primary, key[0], key[1],
                    resource.content))
        else:
            return None
    return rows


def _built(body: bytes) -> Translation:
    view = memoryview(body)
    (length,) = _LENGTH.unpack_from(view)
    end = _LENGTH.size + length
    (application, facility, control_id, message_type, received_at, last_updated,
     unmapped, z_segments, rows) = orjson.loads(view[_LENGTH.size:end])
    pickled: Iterator[dict[str, Any]] = iter(
        pickle.loads(view[end:]) if end < len(body) else ())  # from our own process
    provenance = Provenance(application, facility, control_id, message_type,
                            datetime.fromisoformat(received_at),
                            datetime.fromisoformat(last_updated))
    resources = [trusted_resource(resource_type, id, primary,
                                  None if system is None else key_of_pair((system, value)),
                                  next(pickled) if content is None else content, provenance)
                 for resource_type, id, primary, system, value, content in rows]
    if next(pickled, None) is not None:
        raise ValueError("more pickled contents than resources")
    return Translation(provenance, resources, unmapped, z_segments)


def _pickled_whole(translation: Translation) -> bytes:
    return _PICKLED + zlib.compress(
        pickle.dumps(translation, protocol=pickle.HIGHEST_PROTOCOL), _LEVEL)


def _json_or_none(content: dict[str, Any], pickled: list[dict[str, Any]]
                  ) -> orjson.Fragment | None:
    """The content as JSON; or None, and the content added to `pickled`, when JSON would
    not carry it exactly."""
    try:
        return orjson.Fragment(orjson.dumps(content, default=_refused, option=_STRICT))
    except orjson.JSONEncodeError:
        pickled.append(content)
        return None


def _refused(value: Any) -> Any:
    raise TypeError(type(value).__name__)


def _exact_iso(moment: datetime) -> bool:
    """Whether `datetime.fromisoformat(moment.isoformat())` gives `moment` back, tzinfo
    and all: naive, or at a fixed offset with its default name (as received times and the
    engine's UTC are); not in a zone (its name and rules would be lost), nor folded."""
    if type(moment) is not datetime or moment.fold:
        return False
    zone = moment.tzinfo
    return zone is None or (type(zone) is timezone and zone.tzname(None)
                            == timezone(zone.utcoffset(None)).tzname(None))
