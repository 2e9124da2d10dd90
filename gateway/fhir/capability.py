"""The CapabilityStatement: exactly the interactions and search parameters we serve."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.fhir.search import SearchRegistry

_INTERACTIONS = ("read", "vread", "update", "delete", "history-instance", "history-type",
                 "create", "search-type")
_COMMON = ({"name": "_id", "type": "token"}, {"name": "_lastUpdated", "type": "date"})
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
_SECURITY = {
    "cors": False,
    "service": [{"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
        "code": "SMART-on-FHIR"}]}],
    "description": "SMART Backend Services (client_credentials with a private_key_jwt "
                   "assertion); see /.well-known/smart-configuration. Static API keys and "
                   "tokens of configured issuers are also accepted.",
}


def capability_statement(registry: SearchRegistry, types: Iterable[str],
                         software_version: str = "0.1.0") -> dict[str, Any]:
    resources = [_resource(registry, type_) for type_ in sorted(types)]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-26",
        "kind": "instance",
        "software": {"name": "Isthmus", "version": software_version},
        "implementation": {"description": "Isthmus HL7 v2 / FHIR R4 gateway"},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "security": _SECURITY,
            "resource": resources,
            "interaction": [{"code": "batch"}, {"code": "transaction"}],
        }],
    }


def with_token_endpoint(statement: dict[str, Any], token_url: str) -> dict[str, Any]:
    """The statement with SMART's oauth-uris extension naming our token endpoint.

    SMART App Launch 2.x still lists it in `rest.security` for clients (fhirclient,
    fhir-kit-client) that discover through the CapabilityStatement. The URL depends on the
    request when auth.issuer is unset, so it is added per request to a copy."""
    rest = dict(statement["rest"][0])
    rest["security"] = {
        **rest["security"],
        "extension": [{"url": OAUTH_URIS,
                       "extension": [{"url": "token", "valueUri": token_url}]}],
    }
    return {**statement, "rest": [rest, *statement["rest"][1:]]}


def _resource(registry: SearchRegistry, resource_type: str) -> dict[str, Any]:
    params = [dict(p) for p in _COMMON]
    for name, definition in sorted(registry.params(resource_type).items()):
        if name not in ("_id", "_lastUpdated"):
            params.append({"name": name, "type": definition.type})
    includes = sorted(f"{resource_type}:{name}"
                      for name, definition in registry.params(resource_type).items()
                      if definition.type == "reference")
    # _revinclude is served for every reference parameter that may point at this type.
    revincludes = sorted(f"{source}:{name}" for source in registry.types()
                         for name, definition in registry.params(source).items()
                         if definition.type == "reference"
                         and resource_type in definition.targets)
    return {
        "type": resource_type,
        "interaction": [{"code": code} for code in _INTERACTIONS],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "searchInclude": includes,
        "searchRevInclude": revincludes,
        "searchParam": params,
    }
