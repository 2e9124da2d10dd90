"""Batch and transaction Bundles: entries read into requests, outcomes into the response.

Used by the REST edge (POST /fhir with a Bundle) and by the MLLP pipeline (a translated
message is a transaction Bundle), so both apply writes with the same rules.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from gateway.fhir.outcome import FhirError
from gateway.fhir.search import SearchRegistry
from gateway.store.fhir import SearchQuery, WriteRequest

Method = Literal["GET", "POST", "PUT", "DELETE"]
_METHODS: frozenset[str] = frozenset({"GET", "POST", "PUT", "DELETE"})
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# 'Type' or 'Type/id' and nothing else: what urlsplit would find in it is known (no scheme,
# authority, query or character it drops), so it is not called (a third of a translated
# message's entry parsing; every entry of ours but a conditional one has this form).
_PLAIN_URL = re.compile(r"([A-Z][A-Za-z]{1,63})(?:/([A-Za-z0-9\-.]{1,64}))?")
_ETAG = re.compile(r'(?:W/)?"?(\d{1,18})"?')


@dataclass(frozen=True, slots=True)
class Entry:
    """One Bundle entry's request, checked for shape: `params` is the URL's query (a
    search for GET, the condition for a conditional write)."""

    index: int
    method: Method
    resource_type: str
    id: str | None
    params: tuple[tuple[str, str], ...]
    resource: dict[str, Any] | None
    full_url: str | None
    if_match: int | None
    if_none_exist: tuple[tuple[str, str], ...]
    url: str


def query_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """A search given as text (If-None-Exist, entry.request.ifNoneExist): its pairs."""
    return tuple(parse_qsl(text.lstrip("?"), keep_blank_values=True))


def parse_etag(value: str, where: str) -> int:
    """The version an If-Match (or entry.request.ifMatch) names: W/"3" -> 3."""
    match = _ETAG.fullmatch(value.strip())
    if match is None:
        raise FhirError(400, f"{where}: not a version ETag such as W/\"3\"")
    return int(match.group(1))


def parse_bundle(bundle: dict[str, Any], max_entries: int) -> tuple[str, list[Entry]]:
    """The Bundle's type ('batch' or 'transaction') and its entries, or a 400 naming the
    entry and element that is wrong."""
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        raise FhirError(400, "Bundle.type must be 'batch' or 'transaction'", "Bundle.type")
    raw_entries = bundle.get("entry", [])
    if not isinstance(raw_entries, list):
        raise FhirError(400, "Bundle.entry must be a list", "Bundle.entry")
    if len(raw_entries) > max_entries:
        raise FhirError(413, f"a Bundle may hold at most {max_entries} entries",
                        "Bundle.entry")
    entries = [_entry(i, raw) for i, raw in enumerate(raw_entries)]
    if kind == "transaction":
        urls = [e.full_url for e in entries if e.full_url]
        if len(urls) != len(set(urls)):
            raise FhirError(400, "two entries share a fullUrl", "Bundle.entry.fullUrl")
    return str(kind), entries


def _entry(index: int, raw: Any) -> Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict):
        raise FhirError(400, f"{where}: not an object", where)
    request = raw.get("request")
    if not isinstance(request, dict):
        raise FhirError(400, f"{where}.request is required", f"{where}.request")
    method = request.get("method")
    if method not in _METHODS:
        raise FhirError(400, f"{where}.request.method must be GET, POST, PUT or DELETE",
                        f"{where}.request.method")
    url = request.get("url")
    if not isinstance(url, str) or not url:
        raise FhirError(400, f"{where}.request.url is required", f"{where}.request.url")
    resource_type, id_, params = _split_url(url, f"{where}.request.url")
    resource = raw.get("resource")
    if method in ("POST", "PUT"):
        if not isinstance(resource, dict):
            raise FhirError(400, f"{where}.resource is required for {method}",
                            f"{where}.resource")
        if resource.get("resourceType") != resource_type:
            raise FhirError(400, f"{where}.resource.resourceType does not match the "
                            "request url", f"{where}.resource.resourceType")
    elif resource is not None:
        raise FhirError(400, f"{where}.resource is not allowed with {method}",
                        f"{where}.resource")
    if method == "POST" and (id_ is not None or params):
        raise FhirError(400, f"{where}.request.url for POST is the type alone",
                        f"{where}.request.url")
    if method in ("PUT", "DELETE") and id_ is None and not params:
        raise FhirError(400, f"{where}.request.url for {method} needs an id or a condition",
                        f"{where}.request.url")
    full_url = raw.get("fullUrl")
    if full_url is not None and not isinstance(full_url, str):
        raise FhirError(400, f"{where}.fullUrl must be a string", f"{where}.fullUrl")
    if_match = request.get("ifMatch")
    if_none_exist = request.get("ifNoneExist")
    return Entry(
        index=index, method=method, resource_type=resource_type, id=id_, params=params,
        resource=resource if method in ("POST", "PUT") else None, full_url=full_url,
        if_match=(parse_etag(if_match, f"{where}.request.ifMatch")
                  if isinstance(if_match, str) else None),
        if_none_exist=(query_pairs(if_none_exist)
                       if isinstance(if_none_exist, str) else ()),
        url=url)


def _split_url(url: str, where: str) -> tuple[str, str | None, tuple[tuple[str, str], ...]]:
    """'Patient', 'Patient/123', 'Patient?identifier=a|b' (relative to the base)."""
    plain = _PLAIN_URL.fullmatch(url)
    if plain is not None:
        return plain[1], plain[2], ()
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        raise FhirError(400, f"{where}: use a url relative to the FHIR base", where)
    steps = [s for s in parts.path.split("/") if s]
    if not steps or not _TYPE.fullmatch(steps[0]) or len(steps) > 2:
        raise FhirError(400, f"{where}: expected Type, Type/id or Type?search", where)
    if len(steps) == 2 and not _ID.fullmatch(steps[1]):
        raise FhirError(400, f"{where}: not a valid resource id", where)
    params = tuple(parse_qsl(parts.query, keep_blank_values=True))
    return steps[0], (steps[1] if len(steps) == 2 else None), params


def condition(registry: SearchRegistry, resource_type: str,
              params: Sequence[tuple[str, str]]) -> SearchQuery:
    """A conditional write's search (If-None-Exist, conditional update or delete)."""
    return _condition(registry, resource_type, tuple(params))


# Parsed once per search: every message of a sender names its sending and receiving
# facility's Organization by the same If-None-Exist (2 of an ADT^A01's 3 conditions).
# The query is immutable, so one may be shared; a registry loaded again is a new key.
@functools.lru_cache(maxsize=1024)
def _condition(registry: SearchRegistry, resource_type: str,
               params: tuple[tuple[str, str], ...]) -> SearchQuery:
    parsed = registry.parse(resource_type, params, default_count=2, max_count=2)
    query = parsed.query
    return SearchQuery(resource_type, query.clauses, count=None)


def write_request(registry: SearchRegistry, entry: Entry) -> WriteRequest:
    """The store write for a POST, PUT or DELETE entry (its search already parsed)."""
    assert entry.method != "GET"
    cond: SearchQuery | None = None
    if entry.method == "POST" and entry.if_none_exist:
        cond = condition(registry, entry.resource_type, entry.if_none_exist)
    elif entry.method in ("PUT", "DELETE") and entry.id is None:
        cond = condition(registry, entry.resource_type, entry.params)
    resource = entry.resource
    if entry.method == "PUT" and entry.id is not None and resource is not None:
        if resource.get("id") not in (None, entry.id):
            raise FhirError(400, f"Bundle.entry[{entry.index}].resource.id does not match "
                            "the request url", f"Bundle.entry[{entry.index}].resource.id")
        resource = {**resource, "id": entry.id}
    if entry.method == "POST" and resource is not None and "id" in resource:
        # FHIR R4 http.html#create: a create ignores any id the client sent.
        resource = {k: v for k, v in resource.items() if k != "id"}
    return WriteRequest(method=entry.method, resource_type=entry.resource_type,
                        id=entry.id, resource=resource, condition=cond,
                        if_match=entry.if_match, full_url=entry.full_url)
