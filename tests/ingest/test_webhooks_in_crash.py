"""A gateway killed (SIGKILL) after answering 202 to a webhook, in the middle of fetching
its resource, fetches it when it starts again: the event was recorded before the answer,
and a claim does not outlive the process that made it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp

from conftest import GatewayProcess
from support.fake_ehr import FakeEhr
from support.wait import eventually
from support.webhooks import WebhookSender

SECRET = b"synthetic-crash-hook-secret"
KEY = "synthetic-crash-test-key"


def config_file(tmp_path: Path, ehr: FakeEhr) -> Path:
    path = tmp_path / "isthmus.toml"
    path.write_text(f"""
[processes]
workers = 0

[[auth.api_keys]]
name = "reader"
key_sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"
scopes = ["system/*.rs"]

[[backends]]
name = "ehr"
kind = "fhir"
base_url = "{ehr.url}"
max_retries = 0
read_timeout = 60
webhook = {{ secret_env = "CRASH_HOOK_SECRET", event_id = "/id", resource = "/focus/reference" }}
""")
    return path


async def test_sigkill_mid_fetch_after_202_loses_no_event(tmp_path: Path) -> None:
    async with FakeEhr() as ehr:
        ehr.seed({"resourceType": "Appointment", "id": "a-crash", "status": "booked",
                  "participant": [{"status": "accepted",
                                   "actor": {"reference": "Patient/p1"}}]})
        ehr.delay = 30.0  # the first fetch hangs until the gateway is killed
        env = {"ISTHMUS_CONFIG": str(config_file(tmp_path, ehr)),
               "CRASH_HOOK_SECRET": SECRET.decode()}
        process = GatewayProcess(tmp_path / "var", env=env).start()
        try:
            url = f"http://127.0.0.1:{process.http_port}"
            sent = await WebhookSender(url, "ehr", SECRET).send(
                {"id": "evt-crash", "focus": {"reference": "Appointment/a-crash"}})
            assert sent.status == 202
            await eventually(lambda: bool(ehr.requests_to("GET", "Appointment/a-crash")),
                             timeout=20)
        finally:
            process.kill()
        ehr.delay = 0.0
        restarted = GatewayProcess(tmp_path / "var", env=env).start()
        try:
            url = f"http://127.0.0.1:{restarted.http_port}"

            async def stored() -> bool:
                async with aiohttp.ClientSession(headers={"X-API-Key": KEY}) as http, \
                        http.get(f"{url}/fhir/Appointment/a-crash") as answer:
                    return answer.status == 200

            # Well inside the claim's lease (120 s): the restart voided the dead claim.
            await eventually(stored, timeout=30)
            assert len(ehr.requests_to("GET", "Appointment/a-crash")) == 2
        finally:
            restarted.kill()
