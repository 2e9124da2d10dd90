"""Helpers for tests that drive the FHIR REST edge: a real gateway holding one API key, and
an aiohttp session that presents it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from conftest import RunningGateway, start_gateway

API_KEY = "synthetic-test-key-7f3a"
API_KEY_NAME = "fhir-tests"
ALL_SCOPES = ("system/*.cruds",)
FHIR_JSON = "application/fhir+json"
# The tag on a resource served with elements left out (_elements, _summary, profiles).
SUBSETTED = ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "SUBSETTED")


def api_key_config(name: str, key: str, scopes: Sequence[str],
                   profile: str | None = None) -> dict[str, Any]:
    """One `auth.api_keys` entry: the key known only by its SHA-256."""
    entry: dict[str, Any] = {"name": name, "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                             "scopes": list(scopes)}
    if profile is not None:
        entry["profile"] = profile
    return entry


async def start_fhir_gateway(data_dir: Path, scopes: Sequence[str] = ALL_SCOPES, *,
                             profile: str | None = None, name: str = API_KEY_NAME,
                             key: str = API_KEY, extra_keys: Sequence[dict[str, Any]] = (),
                             **overrides: Any) -> RunningGateway:
    """A running gateway (see conftest.start_gateway) accepting `key` with these scopes,
    and any `extra_keys` (api_key_config entries); `overrides` are dotted config keys
    (profiles need `profiles={...}`). Call `await running.runner.cleanup()` after."""
    keys = [api_key_config(name, key, scopes, profile), *extra_keys]
    return await start_gateway(data_dir, **{"auth.api_keys": keys, **overrides})


def fhir_session(running: RunningGateway, key: str | None = API_KEY,
                 **headers: str) -> aiohttp.ClientSession:
    """A session on the gateway's HTTP port (paths like '/fhir/Patient') sending `key` as
    X-API-Key (None: no credentials) and accepting FHIR JSON."""
    sent = {"Accept": FHIR_JSON, **headers}
    if key is not None:
        sent["X-API-Key"] = key
    return aiohttp.ClientSession(base_url=running.http_url, headers=sent)


@dataclass
class Answer:
    """An HTTP answer, read whole: status, the JSON body (or None), the bytes, the headers."""

    status: int
    body: Any
    raw: bytes
    headers: Any


def is_outcome(answer: Answer, status: int) -> bool:
    """The answer is an OperationOutcome with this status."""
    return (answer.status == status and isinstance(answer.body, dict)
            and answer.body.get("resourceType") == "OperationOutcome")


def tagged_subsetted(resource: dict[str, Any]) -> bool:
    return any((t.get("system"), t.get("code")) == SUBSETTED
               for t in resource.get("meta", {}).get("tag", []))
