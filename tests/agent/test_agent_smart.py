"""An agent platform authenticating as a SMART Backend Services client: a client whose
configured scopes hold `agent` reaches /agent/v1 with its access token; one without it
is refused 403."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import aiohttp
from joserfc import jwt
from joserfc.jwk import ECKey

from conftest import start_gateway
from gateway.edge.auth_server import JWT_BEARER
from support.agent import CALLER, agent_settings


def assertion(key: ECKey, client_id: str, audience: str) -> str:
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": audience, "exp": now + 240,
              "iat": now, "jti": uuid.uuid4().hex}
    return jwt.encode({"alg": "ES384", "kid": key.kid}, claims, key, algorithms=["ES384"])


async def test_a_smart_client_with_the_agent_scope_reaches_the_agent_api(
        tmp_path: Path) -> None:
    key = ECKey.generate_key("P-384", parameters={"kid": "voice-1"})
    jwks = tmp_path / "voice.jwks"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    clients = [{"client_id": "voice-smart", "jwks_file": str(jwks),
                "scopes": ["agent"]},
               {"client_id": "fhir-smart", "jwks_file": str(jwks),
                "scopes": ["system/Patient.rs"]}]
    gw = await start_gateway(tmp_path / "var", **agent_settings(**{"auth.clients": clients}))
    try:
        async with aiohttp.ClientSession() as http:
            token_url = gw.http_url + "/auth/token"

            async def token(client_id: str, scope: str) -> str:
                async with http.post(token_url, data={
                        "grant_type": "client_credentials", "scope": scope,
                        "client_assertion_type": JWT_BEARER,
                        "client_assertion": assertion(key, client_id, token_url)}) as response:
                    body = await response.json()
                    assert response.status == 200, body
                    return str(body["access_token"])

            body = {"purpose": "refill", "call_id": "smart-call", **CALLER}
            for client_id, scope, status, error in (
                    ("voice-smart", "agent", 401, "not_verified"),  # past auth: no patients
                    ("fhir-smart", "system/Patient.rs", 403, "forbidden")):
                bearer = await token(client_id, scope)
                async with http.post(gw.http_url + "/agent/v1/sessions", json=body,
                                     headers={"Authorization": f"Bearer {bearer}"}
                                     ) as response:
                    answer = await response.json()
                assert (response.status, answer["error"]) == (status, error)
    finally:
        await gw.runner.cleanup()
