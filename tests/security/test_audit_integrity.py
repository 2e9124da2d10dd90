"""Audit integrity (issue 13, items 7 and 8).

7. A FHIR write never becomes visible without its audit record: with the audit database
   locked by another connection, every kind of write answers 503 and stores nothing, and
   the client's retry of that 503 makes exactly one resource.
8. Rollback and truncation of the audit trail are caught by something kept outside the
   data directory: an expected head, the published checkpoint file, the head in the log
   line, an HTTP witness, and a signing key kept apart from the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support.fhir import fhir_session, start_fhir_gateway

SYSTEM = "urn:oid:2.999.13.7"
FHIR_JSON = "application/fhir+json"


def observation(label: str, status: str = "final", id_: str | None = None) -> dict[str, Any]:
    """A synthetic Observation known by the identifier `label`."""
    resource: dict[str, Any] = {
        "resourceType": "Observation", "identifier": [{"system": SYSTEM, "value": label}],
        "status": status, "code": {"coding": [{"system": "http://loinc.org",
                                               "code": "8867-4"}]},
        "subject": {"reference": "Patient/synthetic-13"}}
    if id_ is not None:
        resource["id"] = id_
    return resource


def bundle(kind: str, *labels: str) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": [
        {"fullUrl": f"urn:uuid:00000000-0000-4000-8000-00000000000{n}",
         "resource": observation(label),
         "request": {"method": "POST", "url": "Observation"}}
        for n, label in enumerate(labels)]}


@contextlib.contextmanager
def audit_locked(data_dir: Path) -> Iterator[None]:
    """Another connection holds the write lock on audit.db (as a backup tool or a stuck
    CLI would): the gateway's audit writer cannot commit until it is released."""
    db = sqlite3.connect(data_dir / "audit.db", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


async def fhir(http: aiohttp.ClientSession, method: str, path: str,
               body: dict[str, Any] | None = None,
               **headers: str) -> tuple[int, dict[str, Any]]:
    sent = {"Content-Type": FHIR_JSON, **headers} if body is not None else headers
    async with http.request(method, path, json=body, headers=sent) as response:
        text = await response.read()
        return response.status, (await response.json(content_type=None) if text else {})


async def labelled(http: aiohttp.ClientSession, label: str) -> list[dict[str, Any]]:
    """The current Observations carrying identifier `label`."""
    status, found = await fhir(http, "GET", f"/fhir/Observation?identifier={SYSTEM}|{label}")
    assert status == 200, found
    return [e["resource"] for e in found.get("entry", [])]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Any]:
    running = await start_fhir_gateway(tmp_path / "var")
    try:
        yield running
    finally:
        await running.runner.cleanup()


async def test_writes_with_the_audit_store_locked_answer_503_and_store_nothing(
        gateway: Any) -> None:
    async with fhir_session(gateway) as http:
        status, kept = await fhir(http, "POST", "/fhir/Observation", observation("kept"))
        assert status == 201, kept
        kept_id = kept["id"]
        status, doomed = await fhir(http, "POST", "/fhir/Observation",
                                    observation("doomed"))
        assert status == 201, doomed
        doomed_id = doomed["id"]
        writes = [
            ("POST", "/fhir/Observation", observation("create"), {}),
            ("POST", "/fhir/Observation", observation("if-none-exist"),
             {"If-None-Exist": f"identifier={SYSTEM}|if-none-exist"}),
            ("PUT", f"/fhir/Observation/{kept_id}",
             observation("kept", "amended", kept_id), {}),
            ("PUT", f"/fhir/Observation?identifier={SYSTEM}|cond-update",
             observation("cond-update"), {}),
            ("DELETE", f"/fhir/Observation/{doomed_id}", None, {}),
            ("DELETE", f"/fhir/Observation?identifier={SYSTEM}|kept", None, {}),
            ("POST", "/fhir", bundle("transaction", "tx-1", "tx-2"), {}),
            ("POST", "/fhir", bundle("batch", "batch-1", "batch-2"), {}),
        ]
        with audit_locked(gateway.data_dir):
            answers = await asyncio.gather(*(
                fhir(http, method, path, body, **headers)
                for method, path, body, headers in writes))
        for (method, path, _, _), (status, outcome) in zip(writes, answers, strict=True):
            assert status == 503, f"{method} {path}: {status} {outcome}"
            assert outcome["resourceType"] == "OperationOutcome"
        # Nothing of what was answered 503 is stored.
        for label in ("create", "if-none-exist", "cond-update", "tx-1", "tx-2", "batch-1",
                      "batch-2"):
            assert await labelled(http, label) == [], label
        status, current = await fhir(http, "GET", f"/fhir/Observation/{kept_id}")
        assert status == 200 and current["status"] == "final"
        assert current["meta"]["versionId"] == "1"
        status, _ = await fhir(http, "GET", f"/fhir/Observation/{doomed_id}")
        assert status == 200
        # The client retries its 503: exactly one resource, and it is on record.
        status, _ = await fhir(http, "POST", "/fhir/Observation", observation("create"))
        assert status == 201
        assert len(await labelled(http, "create")) == 1
