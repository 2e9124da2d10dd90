"""Reads and history answered by the local store: the stored JSON bytes as they are, cut
only by a profile or `_elements`; every version returned is one the caller may see
(`FhirApi.visibility`: compartment and scope constraints), another patient's resource
answers 404 exactly like one that does not exist, and every access is recorded before
the answer leaves."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.audit.record import Action
from gateway.edge.fhir_api import Call, Visibility
from gateway.edge.fhir_request import (
    access,
    bundle,
    elements_param,
    paging_links,
    resource_answer,
    unknown,
)
from gateway.fhir.outcome import FhirError
from gateway.fhir.search import date_range
from gateway.store.fhir import HistoryQuery, StoredResource


async def read(call: Call) -> web.StreamResponse:
    request = call.request
    elements = elements_param(call)
    stored = await readable(call, request.match_info["id"])
    etag = f'W/"{stored.version}"'
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag})
    body = call.api.shaped(call.principal, stored, elements)
    return resource_answer(stored, body)


async def vread(call: Call) -> web.StreamResponse:
    request = call.request
    stored = await readable(call, request.match_info["id"], int(request.match_info["vid"]))
    return resource_answer(stored, call.api.shaped(call.principal, stored))


async def readable(call: Call, id_: str, version: int | None = None) -> StoredResource:
    """The version if it exists, is not deleted and the caller may see it (its patient's
    compartment, its scopes' constraints: `FhirApi.visibility`); what it may not see
    answers 404 exactly like what does not exist."""
    api, type_ = call.api, call.resource_type
    api.authorize(call.principal, call.interaction, type_)
    seen = api.visibility(call.principal, call.interaction, type_)
    stored = (await api.store.read(type_, id_) if version is None
              else await api.store.vread(type_, id_, version))
    if stored is None:
        await api.record([access(call, Action.READ, "404", resource_id=f"{type_}/{id_}")])
        raise unknown(type_)
    if not seen.shows_stored(stored):
        # Whose a deleted version was cannot be judged either: both answer 404.
        await api.record([access(call, Action.READ, "404", resource_id=f"{type_}/{id_}",
                                 patient=seen.patient)])
        raise unknown(type_)
    if stored.deleted:
        await api.record([access(call, Action.READ, "410", resource_id=f"{type_}/{id_}")])
        raise FhirError(410, f"this {type_} was deleted")
    if api.limits.audit_reads != "off":
        # Whose data this is goes into the record (a Patient is its own).
        owners = ({f"Patient/{stored.id}"} if type_ == "Patient"
                  else api.patients_of(type_, orjson.loads(stored.body)))
        await api.record_read([access(call, Action.READ, resource_id=f"{type_}/{id_}",
                                      patient=min(owners) if owners else None)])
    return stored


# -- history ----------------------------------------------------------------------------------


async def history(call: Call) -> web.Response:
    """An instance's history, or a type's (interaction `history-type`)."""
    if call.interaction == "history":
        return await _instance_history(call)
    call.api.authorize(call.principal, "search", call.resource_type)
    if call.api.confined_to(call.principal, call.resource_type) is not None:
        raise FhirError(403, "type history is not available to patient-level scopes")
    seen = call.api.visibility(call.principal, "search", call.resource_type)
    return await _history(call, HistoryQuery(call.resource_type), None, seen,
                          markers=seen.unrestricted)


async def _instance_history(call: Call) -> web.Response:
    id_ = call.request.match_info["id"]
    api = call.api
    api.authorize(call.principal, "read", call.resource_type)
    seen = api.visibility(call.principal, "read", call.resource_type)
    current = await api.store.read(call.resource_type, id_)
    if current is None:
        raise unknown(call.resource_type)
    if not seen.unrestricted:
        # An instance none of whose versions the caller may see answers like an unknown
        # id; else only the versions it may see are listed (as vread answers them).
        page = await api.store.history(HistoryQuery(call.resource_type, id_, count=1000))
        if not any(seen.shows_stored(v) for v in page.resources if not v.deleted):
            raise unknown(call.resource_type)
    # Whose history this is, for the audit record: the current version's patient.
    owners = (set() if current.deleted
              else api.patients_of(call.resource_type, orjson.loads(current.body)))
    subject = min(owners) if owners else seen.patient
    # Its deletion markers tell no more than the versions shown: they are listed.
    return await _history(call, HistoryQuery(call.resource_type, id_), id_, seen,
                          subject, markers=True)


async def _history(call: Call, base_query: HistoryQuery, id_: str | None, seen: Visibility,
                   subject: str | None = None, *, markers: bool) -> web.Response:
    request, api = call.request, call.api
    count = _int_param(request, "_count", api.limits.default_count, api.limits.max_count)
    offset = _int_param(request, "_offset", 0, 10**9)
    since = _since_param(request)
    query = HistoryQuery(base_query.resource_type, base_query.id, since=since,
                         count=count, offset=offset)
    page = await api.store.history(query)
    base = api.base(request)
    entries = []
    for version in page.resources:
        if not (markers and version.deleted) and not seen.shows_stored(version):
            continue  # a version the caller may not see: vread says 404 too
        url = f"{base}/{version.resource_type}/{version.id}"
        method = "DELETE" if version.deleted else ("POST" if version.version == 1 else "PUT")
        parts = [b'{"fullUrl":', orjson.dumps(url)]
        if not version.deleted:
            parts += [b',"resource":', api.shaped(call.principal, version)]
        parts += [b',"request":', orjson.dumps({"method": method, "url": (
            f"{version.resource_type}/{version.id}" if method != "POST"
            else version.resource_type)}), b',"response":', orjson.dumps({
                "status": "410 Gone" if version.deleted else "200 OK",
                "etag": f'W/"{version.version}"', "lastModified": version.last_updated}),
            b"}"]
        entries.append(b"".join(parts))
    links = paging_links(request, base, offset, count, page.total or 0)
    if api.limits.audit_reads != "off":
        await api.record_read([access(call, Action.READ, resource_id=(
            f"{call.resource_type}/{id_}" if id_ else None), query_shape="_history",
            patient=subject)])
    # A limited caller's total would count the versions left out.
    return bundle("history", entries, links, page.total if seen.unrestricted else None)


def _since_param(request: web.Request) -> str | None:
    """_since as the store's fixed-width UTC instant: the store compares text, so an
    offset or a shorter form given as is would compare wrong."""
    raw = request.query.get("_since")
    if raw is None:
        return None
    covered = date_range(raw.strip().replace(" ", "+"))  # an unencoded '+' is a space
    if covered is None:
        raise FhirError(400, "_since must be an instant, e.g. 2026-11-26T08:30:00Z", "_since")
    return covered[0]


def _int_param(request: web.Request, name: str, default: int, ceiling: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise FhirError(400, f"{name} must be a non-negative integer", name)
    return min(int(raw), ceiling)
