"""The FHIR facade: requests for resource types routed to a remote FHIR backend are
proxied to it, under the same policy as the local store's answers.

Before any call: the caller's scopes and task profile (403), search parameters parsed
with the same table (unknown ones refused, values never echoed), a write's body checked
by the same guard and validation. The query sent for a patient-confined caller carries
the patient's compartment parameter. What comes back is normalised by the backend's
vendor table, then checked again in memory (compartment and scope constraints, every
search entry: a backend that ignores a parameter cannot widen an answer), cut by the
profile and `_elements`, and its URLs rewritten to our base. The backend's refusals
(status, OperationOutcome, Retry-After) pass through as it sent them; a backend that
cannot be asked answers 503 with Retry-After at once (an open breaker makes no network
call), no answer in time 504, an answer that is not FHIR JSON 502. GET reads and searches
are cached for a few seconds per backend (the raw answer, before policy, which every hit
applies again); a write drops its type's entries. Batch and transaction Bundles are
answered by the local store only: an entry for a proxied type is refused there.

Here: the facade (which backend serves a request) and `Remote`, its answers to the
interactions (`fhir_api.Interactions`); reads are answered here, searches in
`fhir_proxy_search`, writes in `fhir_proxy_writes`, the backend call in `fhir_proxy_backend`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from aiohttp import web

from gateway.audit.record import Action
from gateway.edge import (
    fhir_proxy_bundle,
    fhir_proxy_operations,
    fhir_proxy_search,
    fhir_proxy_writes,
)
from gateway.edge.fhir_api import Call, Pairs
from gateway.edge.fhir_proxy_backend import BackendLink, passed_headers
from gateway.edge.fhir_request import access, elements_param, unknown
from gateway.fhir import jsonio
from gateway.fhir.outcome import FHIR_JSON, FhirError
from gateway.forward.cache import ReadCache
from gateway.forward.fhir_backend import FhirBackend
from gateway.forward.metrics import FacadeMetrics
from gateway.forward.normalize import Normalizer, Operation
from gateway.forward.routes import LOCAL, Router
from gateway.policy.cursors import PageCursors
from gateway.telemetry import Telemetry


class Facade:
    """Which backend serves a FHIR request, the read-through cache and the vendor tables."""

    def __init__(self, router: Router, backends: Mapping[str, FhirBackend],
                 cache: ReadCache | Mapping[str, ReadCache] | None = None,
                 normalizers: Mapping[str, Normalizer] | None = None,
                 cursors: PageCursors | None = None,
                 telemetry: Telemetry | None = None) -> None:
        """`cache`: one read-through cache for every backend, or one per backend name (a
        backend without one is not cached); `normalizers`: vendor tables by backend;
        `cursors`: what seals the backends' paging links (a key of this process when not
        given); `telemetry`: where the facade's counters go (none when not given)."""
        self.router = router
        self.backends = dict(backends)
        self.cache = cache
        self.normalizers = dict(normalizers or {})
        self.cursors = cursors if cursors is not None else PageCursors()
        self.metrics = FacadeMetrics.of(telemetry.meter) if telemetry is not None else None
        if self.metrics is not None:
            for normalizer in {id(n): n for n in self.normalizers.values()}.values():
                self.metrics.watch_table(normalizer.name, _hits_of(normalizer))
        self._routes: dict[tuple[str, str], FhirBackend | None] = {}

    def cache_for(self, backend: str) -> ReadCache | None:
        if self.cache is None or isinstance(self.cache, ReadCache):
            return self.cache
        return self.cache.get(backend)

    def backend_for(self, resource_type: str, interaction: str) -> FhirBackend | None:
        """The backend that answers this interaction on this type; None: the local store."""
        key = (resource_type, interaction)
        if key not in self._routes:
            asked = "history" if interaction.startswith("history") else interaction
            name = self.router.for_request(resource_type, asked)
            self._routes[key] = None if name == LOCAL else self.backends.get(name)
        return self._routes[key]

    def served_by(self, resource_type: str, interaction: str) -> str | None:
        """The name of the backend that serves this; None: the local store."""
        backend = self.backend_for(resource_type, interaction)
        return None if backend is None else backend.name

    def remote(self, resource_type: str, interaction: str) -> Remote | None:
        """The proxy for a request whose type a backend serves; None: the local store."""
        backend = self.backend_for(resource_type, interaction)
        if backend is None:
            return None
        return Remote(self._link(backend))

    def operation(self, resource_type: str, name: str, level: str
                  ) -> tuple[Remote, Operation] | None:
        """The proxy for an operation a backend serving this type declares in its vendor
        table (routed like the interaction whose scope it needs); None: not offered."""
        for backend in dict.fromkeys(b for b in (
                self.backend_for(resource_type, i) for i in _INTERACTIONS) if b is not None):
            normalizer = self.normalizer(backend.name)
            declared = normalizer.operation(resource_type, name, level) if normalizer else None
            if declared is not None and self.backend_for(
                    resource_type, declared.interaction) is backend:
                return Remote(self._link(backend)), declared
        return None

    def _link(self, backend: FhirBackend) -> BackendLink:
        return BackendLink(backend, self.cache_for(backend.name),
                           self.normalizer(backend.name), self.cursors, self.metrics)

    def normalizer(self, backend: str) -> Normalizer | None:
        found = self.normalizers.get(backend)
        return found if found else None


def _hits_of(normalizer: Normalizer) -> Callable[[], dict[int, int]]:
    return lambda: normalizer.hits


_INTERACTIONS = ("read", "search", "create", "update", "delete")


class Remote:
    """The facade's answers to one request, from the backend that serves its type. A
    backend's refusal is raised as it came and answered by `fhir_errors.outcomes`."""

    def __init__(self, link: BackendLink) -> None:
        self.link = link

    async def read(self, call: Call) -> web.Response:
        return await self._read(call, None)

    async def vread(self, call: Call) -> web.Response:
        return await self._read(call, call.request.match_info["vid"])

    async def history(self, call: Call) -> web.Response:
        call.api.authorize(call.principal, "read" if call.interaction == "history"
                           else "search", call.resource_type)
        raise FhirError(501, f"history is not available for {call.resource_type}: it is "
                        f"served by backend {self.link.name}", code="not-supported")

    async def search(self, call: Call, params: Pairs) -> web.Response:
        page = fhir_proxy_bundle.opened(self.link, call, params)
        if page is not None and page.operation:
            return await fhir_proxy_operations.next_page(self.link, call, page)
        return await fhir_proxy_search.search(self.link, call, params, page)

    async def operation(self, call: Call, operation: Operation) -> web.Response:
        return await fhir_proxy_operations.operation(self.link, call, operation)

    async def create(self, call: Call) -> web.Response:
        return await fhir_proxy_writes.create(self.link, call)

    async def update(self, call: Call) -> web.Response:
        return await fhir_proxy_writes.update(self.link, call)

    async def conditional_update(self, call: Call) -> web.Response:
        return await fhir_proxy_writes.conditional_update(self.link, call)

    async def delete(self, call: Call) -> web.Response:
        return await fhir_proxy_writes.delete(self.link, call)

    async def conditional_delete(self, call: Call) -> web.Response:
        return await fhir_proxy_writes.conditional_delete(self.link, call)

    async def _read(self, call: Call, version: str | None) -> web.Response:
        api, principal, type_ = call.api, call.principal, call.resource_type
        id_ = call.request.match_info["id"]
        elements = elements_param(call) if version is None else None
        api.authorize(principal, call.interaction, type_)
        target = f"{type_}/{id_}"
        path = target if version is None else f"{target}/_history/{version}"
        seen = api.visibility(principal, call.interaction, type_)
        response = await self.link.ask(call, "GET", path, cached=(type_,))
        patient = seen.patient
        if response.status == 404 or (response.status == 410 and not seen.unrestricted):
            # A deleted resource a limited caller cannot judge answers like an unknown one.
            await api.record([access(call, Action.READ, "404", resource_id=target,
                                     patient=patient if response.status == 410 else None)])
            error = unknown(type_)
            if response.status == 404:
                error.details = self.link.error_codes(response)  # the vendor's codes
            raise error
        if response.status == 410:
            await api.record([access(call, Action.READ, "410", resource_id=target)])
            raise FhirError(410, f"this {type_} was deleted")
        if response.status != 200:
            raise self.link.refused(response)
        resource = self.link.resource(response, type_)
        if not seen.shows(resource):
            # As the local read: what the compartment or the scope does not show.
            await api.record([access(call, Action.READ, "404", resource_id=target,
                                     patient=patient)])
            raise unknown(type_)
        if api.limits.audit_reads != "off":
            owners = api.patients_of(type_, resource)
            await api.record_read([access(call, Action.READ, resource_id=target,
                                          patient=min(owners) if owners else None)])
        headers = passed_headers(response, resource)
        etag = headers.get("ETag")
        if etag is not None and call.request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        body = jsonio.dumps(api.shaped_resource(principal, resource, elements))
        return web.Response(body=body, headers=headers, content_type=FHIR_JSON)
