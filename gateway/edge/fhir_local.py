"""The local store's answers to the FHIR interactions (`fhir_api.Interactions`), gathered
from the modules that hold them: reads and history, search, writes."""

from __future__ import annotations

from aiohttp import web

from gateway.edge import fhir_reads, fhir_search, fhir_writes
from gateway.edge.fhir_api import Call, Pairs


class LocalStore:
    """Every interaction answered from the embedded FHIR store."""

    async def read(self, call: Call) -> web.StreamResponse:
        return await fhir_reads.read(call)

    async def vread(self, call: Call) -> web.StreamResponse:
        return await fhir_reads.vread(call)

    async def history(self, call: Call) -> web.Response:
        return await fhir_reads.history(call)

    async def search(self, call: Call, params: Pairs) -> web.Response:
        return await fhir_search.search(call, params)

    async def create(self, call: Call) -> web.Response:
        return await fhir_writes.create(call)

    async def update(self, call: Call) -> web.Response:
        return await fhir_writes.update(call)

    async def conditional_update(self, call: Call) -> web.Response:
        return await fhir_writes.conditional_update(call)

    async def delete(self, call: Call) -> web.Response:
        return await fhir_writes.delete(call)

    async def conditional_delete(self, call: Call) -> web.Response:
        return await fhir_writes.conditional_delete(call)


LOCAL = LocalStore()
