"""Where the agent API reads and writes: per resource type, the local FHIR store or the
remote EHR the routes name, reached through the facade's public interface (its backend,
read-through cache and vendor table for that type). Both answer plain FHIR JSON; every
failure to answer is BackendDown, which the service turns into 503 emr_unavailable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from gateway.edge.fhir_proxy import Facade
from gateway.fhir import jsonio
from gateway.fhir.search import SearchRegistry
from gateway.forward.backend import FhirResponse
from gateway.forward.errors import BackendUnavailable
from gateway.store.errors import StoreUnavailable, WriteConflict
from gateway.store.fhir import FhirStore, WriteRequest

Json = dict[str, Any]
Pairs = Sequence[tuple[str, str]]
# Enough for one patient's appointments or medications, or a day's free slots.
PAGE = 200


class BackendDown(Exception):
    """The store or the EHR could not answer; `retry_after` in seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("backend down")
        self.retry_after = retry_after


class Conflict(Exception):
    """A write refused because what it changes changed meanwhile (a slot just taken)."""


class Records(Protocol):
    async def search(self, resource_type: str, params: Pairs) -> list[Json]: ...

    async def read(self, resource_type: str, id: str, *, fresh: bool = False) -> Json | None:
        ...

    async def write(self, writes: list[tuple[Json, int | None]]) -> list[Json]:
        """Create (no id) or update (with If-Match on the version given) all at once."""
        ...

    @property
    def remote(self) -> bool: ...


class LocalRecords:
    """The gateway's own FHIR store: several writes commit together or not at all."""

    remote = False

    def __init__(self, store: FhirStore, registry: SearchRegistry) -> None:
        self.store = store
        self.registry = registry

    async def search(self, resource_type: str, params: Pairs) -> list[Json]:
        parsed = self.registry.parse(resource_type, [*params, ("_count", str(PAGE))],
                                     default_count=PAGE, max_count=PAGE)
        try:
            page = await self.store.search(parsed.query)
        except StoreUnavailable:
            raise BackendDown(1.0) from None
        return [jsonio.loads(r.body) for r in page.resources]

    async def read(self, resource_type: str, id: str, *, fresh: bool = False) -> Json | None:
        try:
            stored = await self.store.read(resource_type, id)
        except StoreUnavailable:
            raise BackendDown(1.0) from None
        if stored is None or stored.deleted:
            return None
        found: Json = jsonio.loads(stored.body)
        return found

    async def write(self, writes: list[tuple[Json, int | None]]) -> list[Json]:
        requests = [WriteRequest("PUT", r["resourceType"], id=r["id"], resource=r,
                                 if_match=version) if r.get("id") else
                    WriteRequest("POST", r["resourceType"], resource=r)
                    for r, version in writes]
        try:
            outcomes = await self.store.transact(requests, atomic=True)
        except WriteConflict as exc:
            if exc.status in (409, 412):
                raise Conflict() from None
            raise
        except StoreUnavailable:
            raise BackendDown(1.0) from None
        return [jsonio.loads(o.stored.body) for o in outcomes
                if not isinstance(o, Exception) and o.stored is not None]


class RemoteRecords:
    """The EHR behind the facade, for the types the routes send there; the others (a
    gateway that keeps some types locally) are asked of `local`."""

    remote = True

    def __init__(self, facade: Facade, local: LocalRecords) -> None:
        self.facade = facade
        self.local = local

    async def search(self, resource_type: str, params: Pairs) -> list[Json]:
        if self.facade.backend_for(resource_type, "search") is None:
            return await self.local.search(resource_type, params)
        query = [*params, ("_count", str(PAGE))]
        document = await self._get(resource_type, "search", resource_type, query)
        if document is None or document.get("resourceType") != "Bundle":
            raise BackendDown(1.0)
        return [e["resource"] for e in document.get("entry") or ()
                if isinstance(e, dict) and isinstance(e.get("resource"), dict)
                and e["resource"].get("resourceType") == resource_type
                and (e.get("search") or {}).get("mode", "match") == "match"]

    async def read(self, resource_type: str, id: str, *, fresh: bool = False) -> Json | None:
        if self.facade.backend_for(resource_type, "read") is None:
            return await self.local.read(resource_type, id)
        document = await self._get(resource_type, "read", f"{resource_type}/{id}", (),
                                   cached=not fresh)
        if document is not None and document.get("resourceType") != resource_type:
            raise BackendDown(1.0)
        return document

    async def write(self, writes: list[tuple[Json, int | None]]) -> list[Json]:
        """One request per write, in order (a FHIR backend's Appointment POST books its
        slot: the gateway does not write the EHR's Slot)."""
        written = []
        for resource, _ in writes:
            kind = resource["resourceType"]
            interaction = "update" if resource.get("id") else "create"
            backend = self.facade.backend_for(kind, interaction)
            if backend is None:
                written += await self.local.write([(resource, None)])
                continue
            path = f"{kind}/{resource['id']}" if resource.get("id") else kind
            method = "PUT" if resource.get("id") else "POST"
            try:
                response = await backend.request(method, path, body=jsonio.dumps(resource),
                                                 headers={"Prefer": "return=representation"})
            except BackendUnavailable as exc:
                raise BackendDown(exc.retry_after) from None
            finally:
                self._invalidate(backend.name, kind)
            if response.status in (409, 412, 422):
                raise Conflict()
            if response.status >= 300:
                raise BackendDown(_retry_after(response))
            body = self._resource(backend.name, response)
            written.append(body if body is not None and body.get("resourceType") == kind
                           else {**resource, "id": _location_id(response, kind)})
        return written

    async def _get(self, resource_type: str, interaction: str, path: str, query: Pairs, *,
                   cached: bool = True) -> Json | None:
        backend = self.facade.backend_for(resource_type, interaction)
        assert backend is not None
        cache = self.facade.cache_for(backend.name) if cached else None
        response = cache.get(backend.name, "GET", path, query) if cache is not None else None
        if response is None:
            ticket = cache.ticket(backend.name, (resource_type,)) if cache else None
            try:
                response = await backend.request("GET", path, query=query)
            except BackendUnavailable as exc:
                raise BackendDown(exc.retry_after) from None
            if cache is not None and ticket is not None and response.status == 200:
                cache.put(backend.name, "GET", path, query, response, (resource_type,),
                          ticket)
        if response.status in (404, 410):
            return None
        if response.status != 200:
            raise BackendDown(_retry_after(response))
        return self._resource(backend.name, response)

    def _resource(self, backend: str, response: FhirResponse) -> Json | None:
        try:
            document = jsonio.loads(response.body) if response.body else None
        except ValueError:
            raise BackendDown(1.0) from None
        if not isinstance(document, dict):
            return None
        normalizer = self.facade.normalizer(backend)
        return normalizer.apply(document) if normalizer is not None else document

    def _invalidate(self, backend: str, resource_type: str) -> None:
        cache = self.facade.cache_for(backend)
        if cache is not None:
            cache.invalidate(backend, resource_type)
            cache.invalidate(backend, "Slot")


def _retry_after(response: FhirResponse) -> float:
    try:
        return max(1.0, float(response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def _location_id(response: FhirResponse, resource_type: str) -> str:
    location = response.headers.get("Location", "")
    _, _, tail = location.partition(f"{resource_type}/")
    return tail.split("/", 1)[0]
