"""What a second FHIR API process would cost the edge's one audit writer (a benchmark,
not a test; issue 15's question whether such a process is the way to more read throughput).

What is measured
----------------
Durable read records (`Action.READ`, a patient, a resource id: what a FHIR read records),
``--producers`` (default 8) concurrent producers, each submitting one record, waiting for
it to be durable and yielding three event-loop turns (a request's own work) before the
next, as lock-step HTTP clients do:

1. ``direct``: the edge process seals and submits each record to its `AuditLog` itself
   (today's layout). CPU per record of the process, records per group commit.
2. ``handed over``: a second process (the would-be FHIR API replica) seals each record
   and sends the sealed row over a Unix socket (length-prefixed JSON) to the edge process,
   which submits it to its audit store and answers with the record's number once it is
   durable (fail closed: the replica answers its client only then). CPU per record of
   each process, records per group commit in the edge.

Both sides use the same keys and a fresh `audit.db` with ``synchronous = full`` (the
gateway's default). The protocol is the simplest that is correct (one frame a record, one
answer a record, parsed from whatever one read returned); a real design would batch the
answers, so the edge's receiving cost here is an upper bound, its commit cost is not.

How to run
----------
    python bench/audit_handoff.py [--records 16000] [--producers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.audit.keys import AuditKeys, load_keys
from gateway.audit.log import AuditLog
from gateway.audit.record import Action, AuditRecord, timestamp
from gateway.audit.sealed import seal
from gateway.store.audit import AuditRow

_FRAME = struct.Struct(">II")  # record number, length of the JSON row
_ANSWER = struct.Struct(">I")  # record number, once durable


def _keys(data_dir: Path) -> AuditKeys:
    keys, _ = load_keys(default_dir=data_dir / "keys", key_file=None, keys_text=None,
                        signing_key_file=None, signing_key_text=None, create=True)
    return keys


def _record(producer: int, number: int) -> AuditRecord:
    ref = f"Patient/bench{producer}-{number}"
    return AuditRecord(Action.READ, "success", client_id="bench", peer="127.0.0.1",
                       resource_type="Patient", resource_id=ref, patient=ref)


async def _request_turns() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def direct(data_dir: Path, records: int, producers: int) -> None:
    log = await AuditLog.open(data_dir / "audit.db", _keys(data_dir))

    async def producer(number: int) -> None:
        for i in range(records // producers):
            await log.submit(_record(number, i))
            await _request_turns()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(producer(n) for n in range(producers)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    commits = log.store.batches_committed  # type: ignore[attr-defined]
    await log.close()
    print(f"direct       {records / wall:8.0f} rec/s   edge {1e6 * cpu / records:6.1f} us/rec"
          f"   {records / commits:4.1f} records a commit")


async def edge(data_dir: Path, socket_path: str, records: int) -> None:
    """The edge side: receive sealed rows, submit each, answer once it is durable."""
    log = await AuditLog.open(data_dir / "audit.db", _keys(data_dir))
    finished = asyncio.Event()
    used: list[float] = []

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cpu = time.process_time()

        def answer(seq: int) -> Callable[[Any], None]:
            return lambda _: writer.write(_ANSWER.pack(seq))

        buffer = b""
        while chunk := await reader.read(65536):
            buffer += chunk
            at = 0
            while len(buffer) - at >= _FRAME.size:
                seq, size = _FRAME.unpack_from(buffer, at)
                if len(buffer) - at - _FRAME.size < size:
                    break
                start = at + _FRAME.size
                f = orjson.loads(buffer[start:start + size])
                at = start + size
                row = AuditRow(f[0], f[1], f[2], f[3], bytes.fromhex(f[4]),
                               bytes.fromhex(f[5]), f[6].encode())
                log.store.submit(row).add_done_callback(answer(seq))
            buffer = buffer[at:]
        used.append(time.process_time() - cpu)
        finished.set()

    server = await asyncio.start_unix_server(connection, socket_path)
    print("ready", flush=True)
    await finished.wait()
    server.close()
    commits = log.store.batches_committed  # type: ignore[attr-defined]
    await log.close()
    print(f"             edge {1e6 * used[0] / records:6.1f} us/rec"
          f"   {records / commits:4.1f} records a commit")


async def replica(data_dir: Path, socket_path: str, records: int, producers: int) -> None:
    """The replica side: seal, send, wait for the edge's answer."""
    ring = _keys(data_dir).ring
    assert ring is not None
    reader, writer = await asyncio.open_unix_connection(socket_path)
    loop = asyncio.get_running_loop()
    waiting: dict[int, asyncio.Future[None]] = {}

    async def answers() -> None:
        while True:
            try:
                (seq,) = _ANSWER.unpack(await reader.readexactly(_ANSWER.size))
            except asyncio.IncompleteReadError:
                return
            waiting.pop(seq).set_result(None)

    listening = asyncio.create_task(answers())
    sent = 0

    async def producer(number: int) -> None:
        nonlocal sent
        for i in range(records // producers):
            row = seal(_record(number, i), timestamp(datetime.now(UTC)), ring, "isthmus")
            assert row.patient_index is not None and row.patient_id_index is not None
            data = orjson.dumps([row.recorded_at, row.action, row.client_id, row.outcome,
                                 row.patient_index.hex(), row.patient_id_index.hex(),
                                 row.body.decode()])
            sent += 1
            done = waiting[sent] = loop.create_future()
            writer.write(_FRAME.pack(sent, len(data)) + data)
            await done
            await _request_turns()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(producer(n) for n in range(producers)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    writer.close()
    await listening
    print(f"handed over  {records / wall:8.0f} rec/s   replica {1e6 * cpu / records:6.1f} "
          "us/rec (seals, sends, waits)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=16_000)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--edge", nargs=2, metavar=("DATA_DIR", "SOCKET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.edge:
        asyncio.run(edge(Path(args.edge[0]), args.edge[1], args.records))
        return 0
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        asyncio.run(direct(Path(first), args.records, args.producers))
        data_dir = Path(second)
        _keys(data_dir)  # made once, read by both processes
        socket_path = str(data_dir / "edge.sock")
        process = subprocess.Popen(
            [sys.executable, __file__, "--records", str(args.records), "--edge",
             str(data_dir), socket_path], stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise SystemExit("the edge process did not start")
            asyncio.run(replica(data_dir, socket_path, args.records, args.producers))
            print(process.stdout.read().rstrip())
        finally:
            process.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
