"""examples/agent_call.py plays a whole call (verify, look up, book, end) against a
gateway this test starts, as an agent platform would run it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest

from conftest import MllpPeer, segments, start_gateway
from gateway.agent import AGENT
from support.agent import AGENT_KEY, MESSAGES, SLOTS, WRITER_KEY, agent_settings, schedule
from support.agent import location as clinic_location
from support.agent import practitioner as clinic_practitioner
from support.wait import eventually

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent_call.py"


async def run_example(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode or 0, out.decode(), err.decode()


@pytest.mark.slow
async def test_the_example_call_verifies_looks_up_books_and_ends(tmp_path: Path) -> None:
    gw = await start_gateway(tmp_path / "var", **agent_settings())
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        for name in ("siu_s12_booked.hl7", "adt_a04_patient.hl7"):
            ack = segments(await peer.request((MESSAGES / name).read_bytes()))
            assert ack["MSA"][0][1] == "AA"
        await peer.close()
        async with aiohttp.ClientSession(headers={"X-API-Key": WRITER_KEY}) as http:
            for resource in (clinic_practitioner(), clinic_location(), schedule(), *SLOTS):
                async with http.put(f"{gw.http_url}/fhir/{resource['resourceType']}/"
                                    f"{resource['id']}", json=resource) as response:
                    assert response.status in (200, 201)

            async def registered() -> bool:
                async with http.get(f"{gw.http_url}/fhir/Patient?telecom:missing=false"
                                    ) as response:
                    body = await response.json(content_type=None)
                    return bool(body.get("entry"))

            await eventually(registered, timeout=20)
        code, out, err = await run_example(
            "--url", gw.http_url, "--api-key", AGENT_KEY, "--call-id", "example-call-1",
            "--last-name", "Agentcanary-Smith", "--date-of-birth", "1980-02-14",
            "--phone", "617 555 0142")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].startswith("verified: Zoë A.")
        assert any(line.startswith("upcoming: 2027-01-15T14:00:00+00:00") for line in lines)
        assert "booked: 2027-02-01T09:00:00+00:00 with Dr Avery Lee at North Clinic" in out
        assert lines[-1] == "session ended"
        assert len(gw.app[AGENT].service.sessions) == 0
        code, out, err = await run_example(
            "--url", gw.http_url, "--api-key", AGENT_KEY, "--last-name", "Nobody",
            "--date-of-birth", "1980-02-14", "--zip", "00000")
        assert code == 1 and '"error": "not_verified"' in err
    finally:
        await gw.runner.cleanup()
