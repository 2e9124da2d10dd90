"""The FHIR R4 REST routes at /fhir: every route registered here, in one table.

Every interaction goes the same way: who is calling (SMART token, external token, API
key), whether their scopes allow this interaction on this type, which patient's
compartment confines them, which minimum-necessary profile cuts what they see. Each route
authenticates the caller (`fhir_request.call_for`), then decides once who answers: the
local store (`fhir_local`) or, for a type routed to a remote FHIR backend, the facade
(`fhir_proxy`), both under the same checks (`fhir_api.FhirApi`). Every access is recorded
in the audit trail before the answer leaves (fail closed: 503 if it cannot be recorded).
Every refusal is raised and answered as an OperationOutcome by `fhir_errors.outcomes`.
"""

from __future__ import annotations

import orjson
from aiohttp import web
from multidict import MultiDict

from gateway.edge.auth_server import AUTH_SERVER
from gateway.edge.fhir_api import FHIR, Call, Interactions, OperationFacade
from gateway.edge.fhir_batch import batch_or_transaction
from gateway.edge.fhir_local import LOCAL
from gateway.edge.fhir_request import call_for, check_format, search_params
from gateway.fhir.capability import with_token_endpoint
from gateway.fhir.outcome import FHIR_JSON, FhirError

routes = web.RouteTableDef()

_TYPE = r"/fhir/{type:[A-Z][A-Za-z]+}"
_INSTANCE = _TYPE + r"/{id:[A-Za-z0-9\-.]{1,64}}"
_OPERATION = r"/{op:\$[a-z][A-Za-z0-9-]{0,63}}"


def answerer(call: Call) -> Interactions:
    """Who answers this request: the facade's proxy when a remote backend serves its type
    and interaction, else the local store. Decided once, before any check."""
    facade = call.api.facade
    remote = None if facade is None else facade.remote(call.resource_type, call.interaction)
    return LOCAL if remote is None else remote


async def _typed(request: web.Request, interaction: str) -> Call:
    return await call_for(request, interaction, request.match_info["type"])


@routes.get("/fhir/metadata")
async def metadata(request: web.Request) -> web.Response:
    """The CapabilityStatement: open, like the SMART well-known document."""
    check_format(request)
    api = request.app[FHIR]
    server = request.config_dict.get(AUTH_SERVER)
    if server is None:
        return web.Response(body=api.capability, content_type=FHIR_JSON)
    statement = with_token_endpoint(dict(api.capability_document),
                                    server.endpoints(request).token_url)
    return web.Response(body=orjson.dumps(statement), content_type=FHIR_JSON)


@routes.get("/fhir/.well-known/smart-configuration")
async def fhir_smart_configuration(request: web.Request) -> web.Response:
    """SMART discovery relative to the FHIR base, where SMART App Launch 2.x puts it
    (clients append the path to the base URL they were given); the root one stays."""
    server = request.config_dict.get(AUTH_SERVER)
    if server is None:
        raise web.HTTPNotFound()
    return web.json_response(server.smart_configuration(server.endpoints(request)))


# -- reads and history ------------------------------------------------------------------------


@routes.get(_INSTANCE)
async def read(request: web.Request) -> web.StreamResponse:
    call = await _typed(request, "read")
    return await answerer(call).read(call)


@routes.get(_INSTANCE + r"/_history/{vid:\d{1,18}}")
async def vread(request: web.Request) -> web.StreamResponse:
    call = await _typed(request, "vread")
    return await answerer(call).vread(call)


@routes.get(_INSTANCE + "/_history")
async def instance_history(request: web.Request) -> web.Response:
    call = await _typed(request, "history")
    return await answerer(call).history(call)


@routes.get(_TYPE + "/_history")
async def type_history(request: web.Request) -> web.Response:
    call = await _typed(request, "history-type")
    return await answerer(call).history(call)


# -- search -----------------------------------------------------------------------------------


@routes.get(_TYPE)
async def search(request: web.Request) -> web.Response:
    call = await _typed(request, "search")
    return await answerer(call).search(call, search_params(request))


@routes.post(_TYPE + "/_search")
async def search_post(request: web.Request) -> web.Response:
    call = await _typed(request, "search")
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise FhirError(415, "POST _search takes application/x-www-form-urlencoded")
    if request.content_length is not None and \
            request.content_length > call.api.limits.max_body_bytes:
        raise FhirError(413, "the search form is too large")
    form = await request.post()
    fields: MultiDict[str] = MultiDict((k, v) for k, v in form.items() if isinstance(v, str))
    # GET and POST _search alike: a remote search sent by POST stays a POST.
    return await answerer(call).search(call, search_params(request, fields))


# -- operations: those a backend's vendor table declares, proxied ------------------------


@routes.get(_TYPE + _OPERATION)
@routes.post(_TYPE + _OPERATION)
async def type_operation(request: web.Request) -> web.Response:
    return await _operation(await _typed(request, "operation"), "type")


@routes.get(_INSTANCE + _OPERATION)
@routes.post(_INSTANCE + _OPERATION)
async def instance_operation(request: web.Request) -> web.Response:
    return await _operation(await _typed(request, "operation"), "instance")


async def _operation(call: Call, level: str) -> web.Response:
    name = call.request.match_info["op"]
    facade = call.api.facade
    found = (facade.operation(call.resource_type, name, level)
             if isinstance(facade, OperationFacade) else None)
    if found is None:
        raise FhirError(404, f"operation {name} is not offered on {call.resource_type} "
                        f"at the {level} level here", code="not-supported")
    remote, declared = found
    response: web.Response = await remote.operation(call, declared)
    return response


# -- writes -----------------------------------------------------------------------------------


@routes.post(_TYPE)
async def create(request: web.Request) -> web.Response:
    call = await _typed(request, "create")
    return await answerer(call).create(call)


@routes.put(_INSTANCE)
async def update(request: web.Request) -> web.Response:
    call = await _typed(request, "update")
    return await answerer(call).update(call)


@routes.put(_TYPE)
async def conditional_update(request: web.Request) -> web.Response:
    call = await _typed(request, "update")
    return await answerer(call).conditional_update(call)


@routes.delete(_INSTANCE)
async def delete(request: web.Request) -> web.Response:
    call = await _typed(request, "delete")
    return await answerer(call).delete(call)


@routes.delete(_TYPE)
async def conditional_delete(request: web.Request) -> web.Response:
    call = await _typed(request, "delete")
    return await answerer(call).conditional_delete(call)


# -- batch and transaction: the local store only (an entry for a proxied type is refused) --


@routes.post("/fhir")
@routes.post("/fhir/")
async def batch(request: web.Request) -> web.Response:
    return await batch_or_transaction(await call_for(request, "batch"))
