"""Local shape, a pharmacy that speaks FHIR: the routes send the gateway's OMP^O09 to a
FHIR backend, which receives the refill request as a transaction (PUT at its id)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from conftest import MllpPeer, segments, start_gateway
from support.agent import MESSAGES, WRITER_KEY, AgentClient, agent_settings
from support.fake_ehr import FakeEhr
from support.wait import eventually


async def test_a_refill_request_goes_to_a_fhir_pharmacy_as_a_transaction(
        tmp_path: Path) -> None:
    pharmacy = FakeEhr()
    await pharmacy.start()
    gw = await start_gateway(tmp_path / "var", **agent_settings(**{
        "backends": [{"name": "pharmacy", "kind": "fhir", "base_url": pharmacy.url,
                      "max_attempts": 3}],
        "routes": [{"match": {"message": "OMP^*", "sender": "ISTHMUS"},
                    "to": ["pharmacy"]}]}))
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        for name in ("rde_o11_refills.hl7", "rds_o13_first.hl7", "adt_a04_patient.hl7"):
            ack = segments(await peer.request((MESSAGES / name).read_bytes()))
            assert ack["MSA"][0][1] == "AA"
        await peer.close()
        async with aiohttp.ClientSession() as http:

            async def applied() -> bool:
                async with http.get(f"{gw.http_url}/fhir/MedicationDispense",
                                    headers={"X-API-Key": WRITER_KEY}) as response:
                    dispensed = bool((await response.json(content_type=None)).get("entry"))
                async with http.get(f"{gw.http_url}/fhir/Patient?telecom:missing=false",
                                    headers={"X-API-Key": WRITER_KEY}) as response:
                    return dispensed and bool(
                        (await response.json(content_type=None)).get("entry"))

            await eventually(applied, timeout=20)
            agent = AgentClient(http, gw.http_url)
            assert (await agent.verify("refill", "call-fhir-pharmacy")).status == 201
            [medication] = (await agent.call("GET", "/medications")).body
            reply = await agent.call("POST", "/refill-requests",
                                     {"medication_id": medication["id"]})
            assert reply.status == 201, reply.body
            await eventually(lambda: bool(pharmacy.transactions))
            [entry] = pharmacy.transactions[0].bundle["entry"]
            assert entry["request"] == {"method": "PUT",
                                        "url": f"MedicationRequest/{reply.body['id']}"}
            sent = entry["resource"]
            assert (sent["status"], sent["intent"]) == ("draft", "order")
            assert sent["priorPrescription"] == {
                "reference": f"MedicationRequest/{medication['id']}"}
    finally:
        await gw.runner.cleanup()
        await pharmacy.stop()
