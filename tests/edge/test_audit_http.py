"""`GET /audit/AuditEvent` for compliance reviewers: own bearer token and role, paging,
PHI decrypted only for a reviewer allowed to, clear OperationOutcomes, every request
itself on record (fail closed)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome

from conftest import MllpPeer, RunningGateway, message, start_gateway, with_control_id
from gateway.audit.export import verify_export
from gateway.edge.audit_http import AUDIT
from support.audit import CANARY_MRN, run_cli

ADT = message("adt_a01.hl7")
TOKENS = {"alice": "alice-reads-the-trail", "bob": "bob-may-decrypt", "eve": "eve-no-role"}


def _reviewer(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "token_sha256": hashlib.sha256(TOKENS[name].encode()).hexdigest(),
            **fields}


REVIEWERS = [_reviewer("alice"), _reviewer("bob", decrypt=True),
             _reviewer("eve", roles=["audit.write"])]


@pytest.fixture
async def reviewed(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    gw = await start_gateway(tmp_path / "var", **{"audit.reviewers": REVIEWERS})
    peer = await MllpPeer.open(gw.mllp_port)
    for i in range(5):
        await peer.request(with_control_id(ADT, f"HTTP-{i}"))
    await peer.close()
    yield gw
    await gw.runner.cleanup()


async def get(gw: RunningGateway, query: str = "", token: str | None = "alice",
              url: str | None = None) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    headers = {"Authorization": f"Bearer {TOKENS.get(token, token)}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(url or f"{gw.http_url}/audit/AuditEvent?{query}",
                            headers=headers) as response:
            return response.status, orjson.loads(await response.read()), response


def events(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"]
            if e["resource"]["resourceType"] == "AuditEvent"]


async def test_a_reviewer_gets_a_valid_searchset_that_verifies_offline(
        reviewed: RunningGateway) -> None:
    status, bundle, response = await get(reviewed)
    assert status == 200 and response.content_type == "application/fhir+json"
    Bundle.model_validate(bundle)
    assert bundle["type"] == "searchset"
    found = events(bundle)
    controls = [next(e for e in event["entity"] if e["type"]["code"] == "XrequestId")
                ["what"]["identifier"]["value"] for event in found[:5]]
    assert controls == [f"HTTP-{i}" for i in range(5)]
    # The request itself was recorded before the answer was built: it is the last entry.
    assert found[5]["subtype"][0]["code"] == "search-type"
    assert CANARY_MRN not in orjson.dumps(bundle).decode()
    report = verify_export(orjson.dumps(bundle), dict(reviewed.app[AUDIT].keys.trusted))
    assert report.ok, report.sorted_problems()


async def test_pages_follow_next_links_to_the_end(reviewed: RunningGateway) -> None:
    seen: list[str] = []
    url = f"{reviewed.http_url}/audit/AuditEvent?action=ingest&_count=2"
    pages = 0
    while url:
        status, bundle, _ = await get(reviewed, url=url)
        assert status == 200
        pages += 1
        seen.extend(e["id"] for e in events(bundle))
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), "")
    assert pages == 3 and seen == ["1", "2", "3", "4", "5"]


async def test_filters_are_the_same_as_the_command_lines(reviewed: RunningGateway) -> None:
    status, bundle, _ = await get(reviewed, f"patient={CANARY_MRN}&client=SYNTHLAB"
                                            "&from=2000-01-01&to=2100-01-01&action=ingest")
    assert status == 200 and len(events(bundle)) == 5
    status, bundle, _ = await get(reviewed, "patient=SOMEONE-ELSE")
    # Only the record of this very search: looking someone up is an access about them.
    assert status == 200 and [e["action"] for e in events(bundle)] == ["E"]


async def test_phi_is_decrypted_only_for_a_reviewer_allowed_to(
        reviewed: RunningGateway) -> None:
    status, outcome, _ = await get(reviewed, "decrypt=true", token="alice")
    assert status == 403
    assert "may not see PHI decrypted" in outcome["issue"][0]["diagnostics"]
    status, bundle, _ = await get(reviewed, "decrypt=true&action=ingest", token="bob")
    assert status == 200
    patient = next(e for e in events(bundle)[0]["entity"] if e["role"]["code"] == "1")
    assert patient["what"]["identifier"]["value"] == CANARY_MRN


@pytest.mark.parametrize(("token", "query", "status", "code", "text"), [
    (None, "", 401, "login", "a reviewer bearer token is required"),
    ("not-a-known-token", "", 401, "login", "a reviewer bearer token is required"),
    ("eve", "", 403, "forbidden", "lacks the role audit.read"),
    ("alice", "from=2026-13-45", 400, "invalid", "from: not a date or time"),
    ("alice", "action=peek", 400, "invalid", "action: unknown action"),
    ("alice", "_count=0", 400, "invalid", "_count: must be between 1 and 1000"),
    ("alice", "_count=many", 400, "invalid", "_count: must be a whole number"),
    ("alice", "patinet=x", 400, "invalid", "patinet: unknown search parameter"),
    ("alice", "decrypt=yes", 400, "invalid", "decrypt: must be true or false"),
    ("alice", "from=2026-12-02&to=2026-12-01", 400, "invalid", "to: must be later than"),
])
async def test_refusals_are_operation_outcomes_and_on_record(
        reviewed: RunningGateway, token: str | None, query: str, status: int, code: str,
        text: str) -> None:
    got, outcome, response = await get(reviewed, query, token=token)
    assert got == status
    OperationOutcome.model_validate(outcome)
    assert outcome["issue"][0]["code"] == code
    assert text in outcome["issue"][0]["diagnostics"]
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    _, bundle, _ = await get(reviewed, "action=search&decrypt=true", token="bob")
    refusal = events(bundle)[0]
    assert refusal["outcomeDesc"] == str(status)


async def test_error_texts_never_repeat_what_was_sent(reviewed: RunningGateway) -> None:
    for query in (f"from={CANARY_MRN}", f"{CANARY_MRN}=1", f"_count={CANARY_MRN}"):
        status, outcome, _ = await get(reviewed, query)
        assert status == 400
        assert CANARY_MRN not in orjson.dumps(outcome).decode()


async def test_every_request_is_on_record_with_the_reviewer_and_query(
        reviewed: RunningGateway) -> None:
    await get(reviewed, f"patient={CANARY_MRN}", token="alice")
    status, bundle, _ = await get(reviewed, "action=search&decrypt=true", token="bob")
    assert status == 200
    first, second = events(bundle)
    assert first["meta"]["profile"][0].endswith("IHE.BasicAudit.PatientQuery")
    user = next(a for a in first["agent"] if a["type"]["coding"][0]["code"] == "IRCP")
    assert user["who"]["identifier"]["value"] == "alice"
    assert user["purposeOfUse"][0]["coding"][0]["code"] == "HCOMPL"
    query = next(e for e in first["entity"] if e["role"]["code"] == "24")
    assert base64.b64decode(query["query"]).decode() == f"patient={CANARY_MRN}"
    assert query["description"] == "patient=*"
    # bob's own request is recorded before its answer is built, so it is in it.
    assert second["agent"][2]["who"]["identifier"]["value"] == "bob"


async def test_fail_closed_503_when_the_request_cannot_be_recorded(
        reviewed: RunningGateway) -> None:
    store = reviewed.app[AUDIT].store
    await store._db.execute("PRAGMA query_only = ON")  # type: ignore[attr-defined]
    status, outcome, _ = await get(reviewed)
    assert status == 503 and outcome["issue"][0]["code"] == "transient"
    assert "entry" not in outcome
    await store._db.execute("PRAGMA query_only = OFF")  # type: ignore[attr-defined]
    assert (await get(reviewed))[0] == 200


async def test_without_reviewers_configured_nobody_gets_in(tmp_path: Path) -> None:
    gw = await start_gateway(tmp_path / "var")
    try:
        status, _, _ = await get(gw, token="alice")
        assert status == 401
    finally:
        await gw.runner.cleanup()


async def test_a_saved_page_verifies_with_the_command_line(reviewed: RunningGateway,
                                                           tmp_path: Path) -> None:
    _, bundle, _ = await get(reviewed, "_count=3")
    page = tmp_path / "page.json"
    page.write_bytes(orjson.dumps(bundle))
    key = tmp_path / "gw.pub.pem"
    key.write_text(run_cli("audit", "--data-dir", str(reviewed.data_dir), "public-key")[1])
    code, out, _ = run_cli("audit", "verify", "--file", str(page), "--public-key", str(key))
    assert code == 0, out
