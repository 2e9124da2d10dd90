"""The console in a real browser (issue 19): Playwright drives Debian's Chromium against a
gateway on 127.0.0.1. An operator finds a message no table could translate, sees why,
fixes nothing but the table, replays it and sees it applied; a reviewer exports a period;
an operator cannot open the audit pages. Screenshots of each page are kept as artefacts
in `test-artifacts/console/` (not committed)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import MllpPeer, RunningGateway, segments
from support.console import PASSWORD, start_console_gateway
from support.wait import eventually

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
TABLES = Path(__file__).resolve().parents[2] / "mappings"
ORU_EVENT_ROW = "ORU^R01,ORU_R01,"
ORU = (b"MSH|^~\\&|SYNTHLAB|SYNTHHOSP|ISTHMUS|GW|20261206101500||ORU^R01|BROWSER-ORU-1|P|2.5.1\r"
       b"PID|1||MRN-BR-1^^^SYNTHHOSP^MR||Testwell^Brow||19800101|F\r"
       b"OBR|1|ORD-BR-1|FIL-BR-1|2345-7^Glucose^LN|||20261206101000\r"
       b"OBX|1|NM|2345-7^Glucose^LN||95|mg/dL|70-99|N|||F\r")
_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


@pytest.fixture
def tables(tmp_path: Path) -> Path:
    """The shipped tables without the ORU^R01 event row: ORU messages are unsupported."""
    copy = tmp_path / "tables"
    shutil.copytree(TABLES, copy)
    events = copy / "events.csv"
    events.write_text("".join(line for line in events.read_text().splitlines(keepends=True)
                              if not line.startswith(ORU_EVENT_ROW)))
    return copy


@pytest.fixture
async def gateway(tmp_path: Path, tables: Path) -> AsyncIterator[RunningGateway]:
    running = await start_console_gateway(tmp_path / "var", **{
        "mapping.tables_dir": tables, "console.secure_cookies": False})
    yield running
    await running.runner.cleanup()


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    assert CHROMIUM.exists(), ("Debian's chromium is needed (apt-get install chromium; "
                               ".ci/run installs it)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                    headless=True, args=_FLAGS)
        yield launched
        await launched.close()


async def _signed_in(browser: object, gateway: RunningGateway, name: str) -> object:
    page = await browser.new_page()  # type: ignore[attr-defined]
    await page.goto(f"{gateway.http_url}/console/login")
    await page.fill("#name", name)
    await page.fill("#password", PASSWORD)
    await page.click("#sign-in")
    return page


async def _shot(page: object, name: str) -> None:
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


async def test_an_operator_finds_a_failed_message_replays_it_and_sees_it_applied(
        gateway: RunningGateway, browser: object, tables: Path) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    assert segments(await peer.request(ORU))["MSA"][0][1] == "AA"
    await peer.close()
    page = await _signed_in(browser, gateway, "admin")
    await _shot(page, "dashboard")
    await page.click("text=Messages")
    await page.select_option("#status", "unsupported")
    await page.click("#search")
    row = page.locator("tr[data-control-id='BROWSER-ORU-1']")
    assert await row.locator(".status").inner_text() == "unsupported"
    error = await row.locator(".error-text").inner_text()
    assert "ORU^R01" in error
    await _shot(page, "messages")
    # The table is fixed on disk; the running gateway is not restarted.
    shutil.copy(TABLES / "events.csv", tables / "events.csv")
    await row.locator("button.replay").click()
    await _shot(page, "replayed")

    async def applied() -> bool:
        await page.click("#refresh")
        return await page.inner_text("#status") == "applied"

    await eventually(applied, timeout=20)
    await page.goto(f"{gateway.http_url}/console/mappings")
    assert "ORU^R01" in await page.inner_text("#types")
    await _shot(page, "mappings")


async def test_a_reviewer_exports_a_period(gateway: RunningGateway, browser: object) -> None:
    page = await _signed_in(browser, gateway, "reviewer")
    assert page.url.endswith("/console/audit")
    await page.fill("#from", "2020-01-01")
    await page.click("#audit-go")
    assert await page.locator("#records tr").count() > 1  # sign-ins are on record
    await _shot(page, "audit")
    async with page.expect_download() as download_info:
        await page.click("#export-ndjson")
    download = await download_info.value
    saved = ARTIFACTS / "audit.ndjson"
    await download.save_as(str(saved))
    lines = saved.read_text().splitlines()
    assert lines and all('"resourceType":"AuditEvent"' in line or '"resourceType"' in line
                         for line in lines[:3])
    await page.click("#verify")
    assert (await page.inner_text("#verdict")).startswith("intact")
    await _shot(page, "verify")


async def test_an_operator_cannot_open_the_audit_pages(gateway: RunningGateway,
                                                       browser: object) -> None:
    page = await _signed_in(browser, gateway, "ops-nophi")
    await page.goto(f"{gateway.http_url}/console/audit")
    assert "reviewer role" in await page.inner_text("#reason")
    await _shot(page, "denied")
