"""Stock FHIR and SMART clients, unmodified, against a real gateway (issue 19, items 1-2):
fhirclient discovers the token endpoint, fhirpy counts, unknown parameters are ignored
unless the client asks for strict handling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fhirclient import client as fhirclient
from fhirclient.auth import FHIROAuth2Auth
from fhirpy import AsyncFHIRClient

from conftest import RunningGateway
from support.fhir import API_KEY, FHIR_JSON, fhir_session, start_fhir_gateway

OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    gateway = await start_fhir_gateway(tmp_path / "var")
    yield gateway
    await gateway.runner.cleanup()


async def _post(running: RunningGateway, resource: dict[str, Any]) -> None:
    async with fhir_session(running, **{"Content-Type": FHIR_JSON}) as http, \
            http.post(f"/fhir/{resource['resourceType']}", json=resource) as response:
        assert response.status == 201, await response.text()


# -- item 1: SMART discovery -----------------------------------------------------------------


async def test_smart_configuration_is_served_under_the_fhir_base(
        running: RunningGateway) -> None:
    async with fhir_session(running, key=None) as http:
        async with http.get("/fhir/.well-known/smart-configuration") as response:
            assert response.status == 200
            under_base = await response.json()
        async with http.get("/.well-known/smart-configuration") as response:
            at_root = await response.json()
    assert under_base == at_root
    assert under_base["token_endpoint"] == f"{running.http_url}/auth/token"
    assert "client-confidential-asymmetric" in under_base["capabilities"]


async def test_capability_statement_names_the_token_endpoint(running: RunningGateway) -> None:
    async with fhir_session(running, key=None) as http, http.get("/fhir/metadata") as response:
        assert response.status == 200
        statement = await response.json()
    security = statement["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    [oauth] = [e for e in security["extension"] if e["url"] == OAUTH_URIS]
    assert oauth["extension"] == [{"url": "token",
                                   "valueUri": f"{running.http_url}/auth/token"}]
    from fhir.resources.R4B.capabilitystatement import CapabilityStatement

    CapabilityStatement.model_validate(statement)


def _fhirclient_discovery(base: str) -> tuple[type, str | None]:
    smart = fhirclient.FHIRClient(settings={
        "app_id": "isthmus-test", "api_base": base,
        # A backend client holds a signed assertion; fhirclient then chooses OAuth2.
        "jwt_token": "assertion-placeholder"})
    smart.server.get_capability()
    auth = smart.server.auth
    return type(auth), getattr(auth, "_token_uri", None)


async def test_fhirclient_discovers_oauth2_and_the_token_endpoint(
        running: RunningGateway) -> None:
    auth_type, token_uri = await asyncio.to_thread(
        _fhirclient_discovery, f"{running.http_url}/fhir/")
    assert auth_type is FHIROAuth2Auth
    assert token_uri == f"{running.http_url}/auth/token"


# -- item 2: unknown search parameters are ignored by default -------------------------------


async def test_fhirpy_count_works(running: RunningGateway) -> None:
    for family in ("Alpha", "Beta", "Alpha"):
        await _post(running, {"resourceType": "Patient", "name": [{"family": family}]})
    client = AsyncFHIRClient(f"{running.http_url}/fhir", extra_headers={"X-API-Key": API_KEY})
    # fhirpy's count() sends _totalMethod, a parameter FHIR servers need not know.
    assert await client.resources("Patient").search(family="Alpha").count() == 2
    assert await client.resources("Patient").count() == 3


async def test_unknown_parameters_are_ignored_and_left_out_of_the_self_link(
        running: RunningGateway) -> None:
    await _post(running, {"resourceType": "Patient", "name": [{"family": "Gamma"}]})
    async with fhir_session(running) as http, \
            http.get("/fhir/Patient?family=Gamma&frobnicate=1&_totalMethod=count") as response:
        assert response.status == 200, await response.text()
        bundle = await response.json()
    assert len(bundle["entry"]) == 1
    [self_link] = [link["url"] for link in bundle["link"] if link["relation"] == "self"]
    assert "family=Gamma" in self_link
    assert "frobnicate" not in self_link and "_totalMethod" not in self_link


async def test_strict_handling_refuses_unknown_parameters(running: RunningGateway) -> None:
    async with fhir_session(running, Prefer="handling=strict") as http, \
            http.get("/fhir/Patient?frobnicate=1") as response:
        assert response.status == 400
        outcome = await response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "frobnicate" in outcome["issue"][0]["diagnostics"]


async def test_a_known_parameter_with_a_bad_value_is_still_refused(
        running: RunningGateway) -> None:
    # Lenient handling covers unknown names only; a malformed value is always an error.
    async with fhir_session(running) as http, \
            http.get("/fhir/Patient?birthdate=not-a-date") as response:
        assert response.status == 400
        assert (await response.json())["resourceType"] == "OperationOutcome"
