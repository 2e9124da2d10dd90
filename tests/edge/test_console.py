"""The operator console over HTTP (issue 19): sign-in, roles, CSRF, cookies, PHI only to
those allowed and always on record, no PHI in URLs, bad input answered clearly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from conftest import MllpPeer, RunningGateway, message, segments
from support.console import PASSWORD, csrf_of, sign_in, start_console_gateway

CANARY = message("canary_adt_a01.hl7")
CANARIES = ("QZXCANARYFAM", "WQVCANARYGIV", "MRNCANARY77123")


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    running = await start_console_gateway(tmp_path / "var", **{"console.secure_cookies": False})
    peer = await MllpPeer.open(running.mllp_port)
    assert segments(await peer.request(CANARY))["MSA"][0][1] == "CA"
    await peer.close()
    yield running
    await running.runner.cleanup()


async def _audit_rows(gateway: RunningGateway) -> list[dict[str, str]]:
    http, _ = await sign_in(gateway, "reviewer")
    async with http:
        async with http.get("/console/audit/export", params={"format": "csv"}) as answer:
            assert answer.status == 200
            text = await answer.text()
    import csv
    import io

    return [row for row in csv.DictReader(io.StringIO(text)) if row["kind"] == "record"]


async def test_cookies_are_httponly_secure_and_samesite_strict(tmp_path: Path) -> None:
    gateway = await start_console_gateway(tmp_path / "var")  # secure_cookies by default
    try:
        async with aiohttp.ClientSession(base_url=gateway.http_url) as http, \
                http.get("/console/login") as answer:
            cookie = answer.headers["Set-Cookie"]
    finally:
        await gateway.runner.cleanup()
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie


async def test_pages_need_a_session(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession(base_url=gateway.http_url) as http:
        for path in ("/console/dashboard", "/console/messages", "/console/audit",
                     "/console/messages/1", "/console/deliveries", "/console/mappings"):
            async with http.get(path, allow_redirects=False) as answer:
                assert answer.status == 303, path
                assert answer.headers["Location"] == "/console/login"


async def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(
        gateway: RunningGateway) -> None:
    answers = []
    async with aiohttp.ClientSession(base_url=gateway.http_url,
                                     cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        for name, password in (("ops", "wrong-password"), ("nobody", PASSWORD)):
            async with http.get("/console/login") as answer:
                token = csrf_of(await answer.text())
            async with http.post("/console/login", data={
                    "name": name, "password": password, "csrf": token}) as answer:
                answers.append((answer.status, "sign-in failed" in await answer.text()))
            async with http.get("/console/dashboard", allow_redirects=False) as answer:
                assert answer.status == 303
    assert answers == [(401, True), (401, True)]


async def test_sign_in_without_the_login_form_token_is_refused(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession(base_url=gateway.http_url) as http, \
            http.post("/console/login", data={"name": "ops", "password": PASSWORD}) as answer:
        assert answer.status == 401


async def test_a_form_post_without_the_session_token_is_refused(
        gateway: RunningGateway) -> None:
    http, _ = await sign_in(gateway, "ops")
    async with http:
        async with http.post("/console/messages/1/replay", data={"csrf": "forged"}) as answer:
            assert answer.status == 403
        async with http.post("/console/deliveries/retry", data={"id": "1"}) as answer:
            assert answer.status == 403


async def test_an_operator_without_phi_rights_sees_no_content(gateway: RunningGateway) -> None:
    http, _ = await sign_in(gateway, "ops-nophi")
    async with http:
        async with http.get("/console/messages") as answer:
            listing = await answer.text()
        async with http.get("/console/messages/1") as answer:
            assert answer.status == 403
            refused = await answer.text()
    assert "CTRL-CANARY" in listing or "messages" in listing
    for canary in CANARIES:
        assert canary not in listing and canary not in refused


async def test_content_is_shown_to_phi_users_and_every_view_is_on_record(
        gateway: RunningGateway) -> None:
    http, _ = await sign_in(gateway, "ops")
    async with http:
        async with http.get("/console/messages/1") as answer:
            assert answer.status == 200
            page = await answer.text()
            assert all(str(answer.url).find(c) < 0 for c in CANARIES)
    assert "QZXCANARYFAM" in page  # the segments, for those allowed
    reads = [r for r in await _audit_rows(gateway)
             if r["action"] == "read" and r["client"] == "isthmus-console"]
    assert [r["user"] for r in reads] == ["ops"]
    assert reads[0]["resource_id"] == "" or "CANARY" not in reads[0]["resource_id"]


async def test_reviewer_pages_need_the_reviewer_role(gateway: RunningGateway) -> None:
    http, _ = await sign_in(gateway, "ops")
    async with http:
        for path in ("/console/audit", "/console/audit/export?format=csv",
                     "/console/audit/verify"):
            async with http.get(path) as answer:
                assert answer.status == 403, path
    http, _ = await sign_in(gateway, "reviewer")
    async with http:
        async with http.get("/console/messages/1") as answer:
            assert answer.status == 403
        async with http.get("/console/audit/verify") as answer:
            assert answer.status == 200
            assert "intact" in await answer.text()
    refusals = [r for r in await _audit_rows(gateway)
                if r["client"] == "isthmus-console" and r["outcome"] == "403"]
    assert len(refusals) == 4


async def test_audit_search_and_export_hold_no_phi_and_bad_periods_are_clear(
        gateway: RunningGateway) -> None:
    http, _ = await sign_in(gateway, "reviewer")
    async with http:
        async with http.get("/console/audit", params={"search": "1", "from": "2020-01-01"}) \
                as answer:
            page = await answer.text()
        async with http.get("/console/audit", params={"search": "1", "from": "yesterday"}) \
                as answer:
            bad = await answer.text()
        async with http.get("/console/audit/export", params={"format": "xml"}) as answer:
            assert answer.status == 400
    assert "ingest" in page
    assert "not a valid" in bad or "from" in bad
    for canary in CANARIES:
        assert canary not in page


async def test_sign_out_ends_the_session(gateway: RunningGateway) -> None:
    http, token = await sign_in(gateway, "ops")
    async with http:
        async with http.post("/console/signout", data={"csrf": token}) as answer:
            assert answer.url.path == "/console/login"
        async with http.get("/console/dashboard", allow_redirects=False) as answer:
            assert answer.status == 303


async def test_an_idle_session_ends(tmp_path: Path) -> None:
    gateway = await start_console_gateway(tmp_path / "var", **{
        "console.secure_cookies": False, "console.idle_timeout_minutes": 0.001})
    try:
        http, _ = await sign_in(gateway, "ops")
        async with http:
            import asyncio

            await asyncio.sleep(0.2)  # past the 0.06 s idle limit
            async with http.get("/console/dashboard", allow_redirects=False) as answer:
                assert answer.status == 303
    finally:
        await gateway.runner.cleanup()


async def test_the_dashboard_shows_counts_and_refusals_without_phi(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    bad = CANARY.replace(b"|2.5.1|", b"|9.9|").replace(b"CTRL", b"REFUSED", 1)
    await peer.request(bad)
    await peer.close()
    http, _ = await sign_in(gateway, "ops")
    async with http:
        async with http.get("/console/dashboard") as answer:
            page = await answer.text()
        async with http.get("/console/mappings") as answer:
            mappings = await answer.text()
    assert "ADT^A01" in page
    assert "ORU^R01" in mappings and "the tables are usable" in mappings
    for canary in CANARIES:
        assert canary not in page


def test_console_user_prints_a_hash_that_signs_in(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "gateway", "console", "user", "ops2", "--role", "operator",
         "--password-stdin"], input="a-long-enough-password\n", capture_output=True,
        text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert 'name = "ops2"' in result.stdout and "scrypt$" in result.stdout
    short = subprocess.run(
        [sys.executable, "-m", "gateway", "console", "user", "ops3", "--role", "operator",
         "--password-stdin"], input="short\n", capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "12 characters" in short.stderr
