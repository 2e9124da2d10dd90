"""The process layout: the edge answers, apply workers (child processes) apply.

Each test runs `isthmus serve --workers N` as a child process and reads the FHIR store the
workers wrote over /fhir: one patient's messages land in the order sent, whatever worker
takes them; a worker or translator killed with SIGKILL is started again and nothing it
held is lost or applied twice; a gateway killed with SIGKILL takes them with it; SIGTERM
stops them all; a translation made for an ACK is the one applied (not made again), also
for the messages sent the moment the gateway listens, while its apply workers still start.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from conftest import GatewayProcess, MllpPeer, message, segments, with_control_id
from support.builders import with_fields
from support.wait import eventually

ADT = message("adt_a01.hl7")
KEY = "synthetic-worker-test-key"
PATIENTS = 6
UPDATES = 4


def _gateway(tmp_path: Path, workers: int) -> GatewayProcess:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    keys = f'[{{ name = "t", key_sha256 = "{digest}", scopes = ["system/*.rs"] }}]'
    return GatewayProcess(tmp_path / "var", extra_args=["--workers", str(workers)], env={
        "ISTHMUS_STORE__SYNCHRONOUS": "normal",
        "ISTHMUS_AUTH__API_KEYS": keys})


def _adt(patient: int, update: int) -> bytes:
    """Patient `patient`'s `update`-th message: its family name says which one it was."""
    raw = with_control_id(ADT, f"W-{patient}-{update}")
    return with_fields(raw, "PID", {3: f"MRN-W{patient:03d}^^^SYNTHHOSP^MR",
                                    5: f"FAMILY{update}^Jane"})


def _workers_of(pid: int, module: str = "gateway.app.worker_main") -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", module],
                         capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _translators_of(pid: int) -> list[int]:
    return _workers_of(pid, "gateway.app.translator_main")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def _statuses(data_dir: Path) -> Counter[str]:
    with sqlite3.connect(data_dir / "inbox.db") as db:
        return Counter(str(r[0]) for r in db.execute("SELECT status FROM inbox"))


async def _send_all(port: int, updates: range) -> None:
    """Each patient's updates in order, patients spread over three connections."""
    peers = [await MllpPeer.open(port) for _ in range(3)]
    try:
        async def one_connection(index: int) -> None:
            for update in updates:
                for patient in range(index, PATIENTS, len(peers)):
                    ack = await peers[index].request(_adt(patient, update), timeout=30)
                    assert segments(ack)["MSA"][0][1] == "AA"

        await asyncio.gather(*(one_connection(i) for i in range(len(peers))))
    finally:
        for peer in peers:
            await peer.close()


async def _families(http_port: int) -> dict[str, str]:
    async with aiohttp.ClientSession(headers={"X-API-Key": KEY}) as session:
        url = f"http://127.0.0.1:{http_port}/fhir/Patient?_count=100"
        async with session.get(url) as response:
            assert response.status == 200
            bundle = await response.json(content_type=None)
    return {r["resource"]["identifier"][0]["value"]: r["resource"]["name"][0]["family"]
            for r in bundle.get("entry", [])}


async def _provenances(http_port: int) -> int:
    async with aiohttp.ClientSession(headers={"X-API-Key": KEY}) as session:
        url = f"http://127.0.0.1:{http_port}/fhir/Provenance?_summary=count"
        async with session.get(url) as response:
            return int((await response.json(content_type=None))["total"])


def _last_families() -> dict[str, str]:
    return {f"MRN-W{p:03d}": f"FAMILY{UPDATES - 1}" for p in range(PATIENTS)}


@pytest.mark.slow
async def test_two_workers_apply_each_patients_messages_in_order(tmp_path: Path) -> None:
    gateway = _gateway(tmp_path, 2).start()
    try:
        assert gateway.proc is not None
        assert len(_workers_of(gateway.proc.pid)) == 2
        await _send_all(gateway.mllp_port, range(UPDATES))

        async def applied() -> bool:
            return await _families(gateway.http_port) == _last_families()

        await eventually(applied, timeout=60, interval=0.2, what="the last update applied")
        await eventually(lambda: _statuses(tmp_path / "var") == {
            "applied": PATIENTS * UPDATES}, timeout=30, what="every row marked applied")
        assert await _provenances(gateway.http_port) == PATIENTS * UPDATES
        # /metrics speaks for each process: the workers' applies add up to the messages.
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{gateway.http_port}/metrics"
            async with session.get(url) as response:
                text = await response.text()
        applied = {line.split("{")[1].split("}")[0]: float(line.split()[-1])
                   for line in text.splitlines()
                   if line.startswith("isthmus_worker_applied_total{")}
        assert set(applied) == {'process="worker-0"', 'process="worker-1"'}
        assert sum(applied.values()) == PATIENTS * UPDATES
        # Taken before: once the edge has exited it has no children to list.
        workers = _workers_of(gateway.proc.pid) + _translators_of(gateway.proc.pid)
        assert len(workers) == 3
        assert gateway.terminate() == 0
        await eventually(lambda: not any(_alive(p) for p in workers), timeout=30,
                         what="every worker and translator gone after SIGTERM")
    finally:
        gateway.kill()


@pytest.mark.slow
async def test_a_killed_worker_or_gateway_loses_nothing_and_applies_nothing_twice(
        tmp_path: Path) -> None:
    gateway = _gateway(tmp_path, 1).start()
    try:
        assert gateway.proc is not None
        [worker] = _workers_of(gateway.proc.pid)
        [translator] = _translators_of(gateway.proc.pid)
        sending = asyncio.create_task(_send_all(gateway.mllp_port, range(UPDATES - 1)))
        await eventually(lambda: sum(_statuses(tmp_path / "var").values()) >= PATIENTS,
                         timeout=30, what="some messages committed")
        # The edge keeps answering (translating for itself); both come back.
        os.kill(worker, signal.SIGKILL)
        os.kill(translator, signal.SIGKILL)
        await sending
        await eventually(lambda: [p for p in _workers_of(gateway.proc.pid) if p != worker],
                         timeout=30, what="the worker started again")
        await eventually(lambda: [p for p in _translators_of(gateway.proc.pid)
                                  if p != translator],
                         timeout=30, what="the translator started again")
        [replacement] = _workers_of(gateway.proc.pid)
        [translator] = _translators_of(gateway.proc.pid)

        gateway.kill()  # SIGKILL: the worker and translator die with the gateway
        await eventually(lambda: not _alive(replacement) and not _alive(translator),
                         timeout=10, what="the worker and translator gone with the gateway")

        gateway.start()
        await _send_all(gateway.mllp_port, range(UPDATES - 1, UPDATES))

        async def applied() -> bool:
            return await _families(gateway.http_port) == _last_families()

        await eventually(applied, timeout=60, interval=0.2, what="the last update applied")
        await eventually(lambda: _statuses(tmp_path / "var") == {
            "applied": PATIENTS * UPDATES}, timeout=30, what="every row marked applied")
        # One Provenance per message: none lost, none applied twice.
        assert await _provenances(gateway.http_port) == PATIENTS * UPDATES
    finally:
        gateway.kill()


async def _worker_counter(http_port: int, name: str) -> float:
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{http_port}/metrics"
        async with session.get(url) as response:
            text = await response.text()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(f"isthmus_worker_{name}_total{{"))


@pytest.mark.slow
async def test_the_translation_made_for_the_ack_is_applied_not_made_again(
        tmp_path: Path) -> None:
    gateway = _gateway(tmp_path, 1).start()
    try:
        assert gateway.proc is not None
        # A round with none translated again shows every translation handed on from the
        # translator to the worker (at start too: the burst test below).
        for update in range(UPDATES):
            again = await _worker_counter(gateway.http_port, "translated_again")
            await _send_all(gateway.mllp_port, range(update, update + 1))

            async def round_applied(update: int = update) -> bool:
                return await _worker_counter(gateway.http_port, "applied") == PATIENTS * (
                    update + 1)

            await eventually(round_applied, timeout=60, interval=0.2,
                             what="the round applied")
            if await _worker_counter(gateway.http_port, "translated_again") == again:
                break
        else:
            pytest.fail("every round was translated again by the worker")
        families = await _families(gateway.http_port)
        assert families == {f"MRN-W{p:03d}": f"FAMILY{update}" for p in range(PATIENTS)}
        assert await _provenances(gateway.http_port) == PATIENTS * (update + 1)
    finally:
        gateway.kill()


@pytest.mark.slow
async def test_a_burst_sent_as_the_gateway_starts_is_translated_once(tmp_path: Path) -> None:
    # The edge listens once its translator is ready; what it translates for the workers,
    # still starting, is held until they are ready and read the inbox. Before, the first
    # messages were translated by the edge (no translator ready yet) or their translation
    # dropped (no worker ready), and each translated again by its worker.
    gateway = _gateway(tmp_path, 2).start()
    try:
        await _send_all(gateway.mllp_port, range(UPDATES))

        async def applied() -> bool:
            return await _worker_counter(gateway.http_port, "applied") == PATIENTS * UPDATES

        await eventually(applied, timeout=60, interval=0.2, what="the burst applied")
        assert await _worker_counter(gateway.http_port, "translated_again") == 0
        assert await _families(gateway.http_port) == _last_families()
    finally:
        gateway.kill()
