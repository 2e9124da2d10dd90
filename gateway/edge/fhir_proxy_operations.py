"""Operations a backend's vendor table declares (`Appointment/$find`, `$book`,
`Patient/{id}/$everything`), proxied under the scope of the interaction the table names
for each: a `search` or `read` operation by GET or POST, any other by POST only. The
parameters and the Parameters body go on as they came (the body checked by the same
guard as a write's); what comes back is checked like any answer: a Bundle entry by entry
(`fhir_proxy_bundle`, its paging links as cursors), a resource against the caller's
compartment and scope; the access is recorded like the interaction's."""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from gateway.audit.record import Action
from gateway.edge.fhir_api import Call, Pairs
from gateway.edge.fhir_proxy_backend import BackendLink, Json, passed_headers
from gateway.edge.fhir_proxy_bundle import Page, answer_bundle
from gateway.edge.fhir_request import access, read_body, unknown, validated
from gateway.fhir import jsonio
from gateway.fhir.outcome import FHIR_JSON, FhirError
from gateway.forward.backend import FhirResponse
from gateway.forward.normalize import Operation

_ACTIONS = {"read": Action.READ, "search": Action.SEARCH, "create": Action.CREATE,
            "update": Action.UPDATE, "delete": Action.DELETE}
# Parameters that shape our answer, not the backend's operation.
_KEPT_HERE = frozenset({"_format", "_pretty"})


async def operation(link: BackendLink, call: Call, declared: Operation) -> web.Response:
    api, principal, type_ = call.api, call.principal, call.resource_type
    api.authorize(principal, declared.interaction, type_)
    method = call.request.method
    if method not in declared.methods:
        raise FhirError(405, f"{declared.name} on {type_} takes "
                        f"{' or '.join(declared.methods)}", code="not-supported")
    id_ = call.request.match_info.get("id")
    patient = api.confined_to(principal, type_)
    if id_ is not None and type_ == "Patient" and patient not in (None, f"Patient/{id_}"):
        raise unknown(type_)  # another patient's: as unknown as an id that does not exist
    path = f"{type_}/{id_}/{declared.name}" if id_ is not None else f"{type_}/{declared.name}"
    params: Pairs = [(k, v) for k, v in call.request.query.items() if k not in _KEPT_HERE]
    reads = declared.interaction in ("read", "search")
    if link.normalizer is not None:
        link.normalizer.operation_used(declared)
    if method == "POST":
        body = await read_body(call.request, api.limits.max_body_bytes)
        kind = body.get("resourceType")
        if not isinstance(kind, str):
            raise FhirError(400, "the body is not a FHIR resource", "resourceType")
        validated(body, kind)
        if not reads:
            # As a write: on record before it is sent (it cannot be rolled back here).
            await api.record([access(call, _ACTIONS[declared.interaction], "pending",
                                     query_shape=declared.name)])
        response = await link.ask(call, "POST", path, query=params, body=jsonio.dumps(body),
                                  idempotent=reads)
    else:
        response = await link.ask(call, "GET", path, query=params)
    return await _answer(link, call, declared, response, params, (declared.name,
                                                                  declared.level))


async def next_page(link: BackendLink, call: Call, page: Page) -> web.Response:
    """The next page of an operation's Bundle, through the cursor of our paging link."""
    normalizer = link.normalizer
    declared = (normalizer.operation(call.resource_type, page.operation, page.level)
                if normalizer is not None else None)
    if declared is None:
        raise FhirError(400, "this paging link's operation is no longer offered", "_cursor")
    call.api.authorize(call.principal, declared.interaction, call.resource_type)
    response = await link.ask(call, "GET", page.relative)
    return await _answer(link, call, declared, response, page.params,
                         (page.operation, page.level))


async def _answer(link: BackendLink, call: Call, declared: Operation, response: FhirResponse,
                  params: Pairs, paging: tuple[str, str]) -> web.Response:
    api, type_ = call.api, call.resource_type
    action = _ACTIONS[declared.interaction]
    if response.status >= 400:
        raise link.refused(response)
    if not 200 <= response.status < 300:
        raise link.bad_answer(f"HTTP {response.status}")
    if not response.body.strip():
        await api.record([access(call, action, query_shape=declared.name)])
        return web.Response(status=response.status)
    document = link.resource(response, None)
    headers: dict[str, str] = {}
    subject: str | None = api.confined_to(call.principal, type_)
    if document["resourceType"] == "Bundle":
        answer, matches, _ = answer_bundle(link, call, document, params=params,
                                           elements=None, trusted=False, operation=paging)
        owners = {p for m in matches if isinstance(m.get("resourceType"), str)
                  for p in api.patients_of(m["resourceType"], m)}
        if subject is None and len(owners) == 1:
            subject = owners.pop()
    elif document["resourceType"] == "OperationOutcome":
        answer = document
    else:
        answer = _checked_resource(call, document)
        headers = passed_headers(response, answer)
        owners = api.patients_of(answer["resourceType"], answer)
        subject = subject or (min(owners) if owners else None)
    record = access(call, action, patient=subject, query=urlencode(params) or None,
                    query_shape=declared.name)
    if declared.interaction in ("read", "search"):
        await api.record_read([record])
    else:
        await api.record([record])
    return web.Response(status=response.status, body=jsonio.dumps(answer), headers=headers,
                        content_type=FHIR_JSON)


def _checked_resource(call: Call, resource: Json) -> Json:
    """A resource an operation answered, shown only if the caller may see it (its
    compartment and scopes, as a read), cut by the profile."""
    api, principal = call.api, call.principal
    kind = str(resource["resourceType"])
    if kind not in api.types:
        if api.confined_to(principal, call.resource_type) is not None:
            raise FhirError(403, f"the answer is a {kind}, which a patient-level caller "
                            "may not be shown here")
        return resource
    api.authorize(principal, "read", kind)
    if not api.visibility(principal, "read", kind).shows(resource):
        raise unknown(kind)
    return api.shaped_resource(principal, resource)
