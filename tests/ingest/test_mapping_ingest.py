"""The MLLP pipeline translates what it accepts: AE naming the field, failed rows, replay."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import MllpPeer, RunningGateway, segments, start_gateway
from gateway.app.files import INBOX_FILE
from gateway.store.inbox_sqlite import read_entries, read_entry
from support.cli import isthmus
from support.sealed import codec_of

BAD_DATE = "19851345"  # month 13: not a date; also the canary for "no value in any text"

GOOD = (b"MSH|^~\\&|SYNTHLAB|SYNTHHOSP|ISTHMUS|GATEWAY|20261126083000+0100||ADT^A01|PIPE-OK|"
        b"P|2.5.1\rEVN|A01|20261126082900\rPID|1||MRN-7001^^^SYNTHHOSP^MR||"
        b"CANARYPIPE^Ana||19800102|F\rPV1|1|I|WARD1^101^A\r")


def bad_date(control_id: str, msh15: str = "") -> bytes:
    return (f"MSH|^~\\&|SYNTHLAB|SYNTHHOSP|ISTHMUS|GATEWAY|20261126083000||ADT^A01|"
            f"{control_id}|P|2.5.1|||{msh15}\rEVN|A01|20261126082900\r"
            f"PID|1||MRN-7002^^^SYNTHHOSP^MR||CANARYPIPE^Bo||{BAD_DATE}|M\r"
            "PV1|1|I\r").encode()


# An event hl7 defines but no shipped table maps (ADT^A17, swap patients).
UNSUPPORTED = (b"MSH|^~\\&|SYNTHLAB|SYNTHHOSP|ISTHMUS|GATEWAY|20261126083000||ADT^A17|"
               b"PIPE-UNSUP|P|2.5.1\rEVN|A17|20261126082900\rPID|1||MRN-7003^^^SYNTHHOSP^MR||"
               b"CANARYPIPE^Cy||19800102|F\rPV1|1|I|WARD1^101^A\r")


async def test_a_translated_message_is_acknowledged_aa_and_marked_translated(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    try:
        ack = segments(await peer.request(GOOD))
    finally:
        await peer.close()
    assert ack["MSA"][0][1] == "AA"
    entries = await read_entries(gateway.data_dir / INBOX_FILE)
    # Translated, and then applied to the FHIR store (which may already have happened).
    assert [(e.control_id, e.error) for e in entries] == [("PIPE-OK", "")]
    assert entries[0].status in ("translated", "applied")


async def test_an_untranslatable_message_gets_ae_naming_the_field_and_is_kept_failed(
        gateway: RunningGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    peer = await MllpPeer.open(gateway.mllp_port)
    try:
        raw_ack = await peer.request(bad_date("PIPE-BAD"))
    finally:
        await peer.close()
    ack = segments(raw_ack)
    assert ack["MSA"][0][1] == "AE"
    assert ack["MSA"][0][2] == "PIPE-BAD"
    err = ack["ERR"][0]
    assert err[2].split("^")[:3] == ["PID", "1", "7"]  # ERR-2: segment, sequence, field
    assert err[3].split("^")[0] == "102"  # data type error
    assert BAD_DATE not in raw_ack.decode()
    assert BAD_DATE not in caplog.text
    entries = await read_entries(gateway.data_dir / INBOX_FILE)
    assert len(entries) == 1
    entry = entries[0]
    assert entry.status == "failed"
    assert entry.error.startswith("PID-7:") and BAD_DATE not in entry.error
    # Still the accepted message, byte for byte: nothing acknowledged is lost.
    found = await read_entry(gateway.data_dir / INBOX_FILE, entry.id,
                             codec_of(gateway.data_dir))
    assert found is not None and found[1] == bad_date("PIPE-BAD")


async def test_a_resend_of_a_failed_message_gets_the_same_ae(gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    try:
        first = segments(await peer.request(bad_date("PIPE-AGAIN")))
        second = segments(await peer.request(bad_date("PIPE-AGAIN")))
    finally:
        await peer.close()
    assert first["MSA"] == second["MSA"] and first["MSA"][0][1] == "AE"
    assert len(await read_entries(gateway.data_dir / INBOX_FILE)) == 1


async def test_enhanced_mode_commits_with_ca_and_keeps_the_failure_for_replay(
        gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    try:
        ack = segments(await peer.request(bad_date("PIPE-ENH", msh15="AL")))
    finally:
        await peer.close()
    assert ack["MSA"][0][1] == "CA"
    entries = await read_entries(gateway.data_dir / INBOX_FILE)
    assert entries[0].status == "failed"


@pytest.mark.slow
async def test_unsupported_types_are_accepted_and_replay_translates_them_once_mapped(
        gateway: RunningGateway, tmp_path: Path) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    try:
        ack = segments(await peer.request(UNSUPPORTED))
        await peer.request(bad_date("PIPE-STILL-BAD"))
    finally:
        await peer.close()
    assert ack["MSA"][0][1] == "AA"
    db = gateway.data_dir / INBOX_FILE
    statuses = {e.control_id: e.status for e in await read_entries(db)}
    assert statuses == {"PIPE-UNSUP": "unsupported", "PIPE-STILL-BAD": "failed"}

    # Without a table change, a replay changes nothing and says so (exit 1).
    data_dir = str(gateway.data_dir)
    code, out, err = await isthmus("inbox", "--data-dir", data_dir, "replay", "--failed",
                                   timeout=60)
    assert code == 1, err
    assert "unsupported" in out and "failed" in out and BAD_DATE not in out

    # A site table maps ADT^A17 like an A01: the replay translates it; the bad date stays.
    site = tmp_path / "site"
    site.mkdir()
    shipped_events = (Path(__file__).parents[2] / "mappings" / "events.csv").read_text()
    (site / "events.csv").write_text(shipped_events.rstrip("\n") + "\nADT^A17,ADT_A01,swap\n")
    env = {"ISTHMUS_MAPPING__SITE_DIR": str(site)}
    code, out, err = await isthmus("inbox", "--data-dir", data_dir, "replay", "--failed",
                                   env=env, timeout=60)
    assert code == 1, err  # one message still fails
    statuses = {e.control_id: e.status for e in await read_entries(db)}
    assert statuses == {"PIPE-UNSUP": "translated", "PIPE-STILL-BAD": "failed"}

    unsupported_id = next(e.id for e in await read_entries(db) if e.control_id == "PIPE-UNSUP")
    code, out, err = await isthmus("inbox", "--data-dir", data_dir, "replay",
                                   str(unsupported_id), env=env, timeout=60)
    assert code == 0 and out.strip() == f"{unsupported_id} translated", (out, err)


@pytest.mark.slow
async def test_replay_of_an_unknown_id_says_so(gateway: RunningGateway) -> None:
    peer = await MllpPeer.open(gateway.mllp_port)
    try:
        await peer.request(GOOD)
    finally:
        await peer.close()
    code, out, err = await isthmus("inbox", "--data-dir", str(gateway.data_dir), "replay", "999",
                                   timeout=60)
    assert code == 1 and "no message with id 999" in err


async def test_strict_mode_still_translates_valid_output(tmp_path: Path) -> None:
    running = await start_gateway(tmp_path / "var", **{"mapping.strict": True})
    try:
        peer = await MllpPeer.open(running.mllp_port)
        try:
            ack = segments(await peer.request(GOOD))
        finally:
            await peer.close()
    finally:
        await running.runner.cleanup()
    assert ack["MSA"][0][1] == "AA"
    entries = await read_entries(tmp_path / "var" / INBOX_FILE)
    assert entries[0].status == "applied"  # the gateway applied it before it stopped


async def test_translation_can_be_turned_off(tmp_path: Path) -> None:
    running = await start_gateway(tmp_path / "var", **{"mapping.translate_on_ingest": False})
    try:
        peer = await MllpPeer.open(running.mllp_port)
        try:
            ack = segments(await peer.request(bad_date("PIPE-OFF")))
        finally:
            await peer.close()
    finally:
        await running.runner.cleanup()
    assert ack["MSA"][0][1] == "AA"
    entries = await read_entries(tmp_path / "var" / INBOX_FILE)
    assert entries[0].status == "accepted"

