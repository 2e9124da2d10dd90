"""Shared by the mapping tests: translate v2 text with the shipped tables, validate, look up."""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson

from gateway.fhir.bundle import dumps, to_bundle
from gateway.fhir.validate import validate_resource
from gateway.hl7.message import parse_message
from gateway.mapping.engine import Translator
from support.builders import hl7

Json = dict[str, Any]


@cache
def translator() -> Translator:
    # The tables as the gateway runs them: generated Python source (in memory here).
    return Translator.load(generate=True)


v2 = hl7  # a message from segment lines (CR-joined, as on the wire)


def translate(data: bytes | str) -> Json:
    """The transaction Bundle for one message, after a JSON round trip and R4 validation."""
    raw = data.encode() if isinstance(data, str) else data
    bundle = orjson.loads(dumps(to_bundle(translator().translate(parse_message(raw)))))
    validate_resource(bundle)
    return bundle


def resources(bundle: Json, resource_type: str) -> list[Json]:
    return [e["resource"] for e in bundle["entry"]
            if e["resource"]["resourceType"] == resource_type]


def one(bundle: Json, resource_type: str) -> Json:
    found = resources(bundle, resource_type)
    assert len(found) == 1, f"expected one {resource_type}, found {len(found)}"
    return found[0]


def entry_of(bundle: Json, resource: Json) -> Json:
    return next(e for e in bundle["entry"] if e["resource"] is resource)


def ref(bundle: Json, resource: Json) -> str:
    """The reference string other entries use for this resource."""
    return str(entry_of(bundle, resource)["fullUrl"])
