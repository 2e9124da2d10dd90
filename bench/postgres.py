"""PostgreSQL beside SQLite, in one run: MLLP msg/s and FHIR reads/s with 1 SQLite gateway,
1 gateway on PostgreSQL and 2 gateways on one PostgreSQL database; then the database's
commit rate for the inbox's own INSERT, and the commits one message costs, which together
say where N instances stop scaling (bench/README.md).

    python bench/postgres.py                    # PostgreSQL at ISTHMUS_BENCH_POSTGRES_URL
    python bench/postgres.py --messages 4000 --connections 8 --reads 4000

The machine is shared and noisy: compare the rows of one run (ratios), not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from gateway.store.pg.connect import PgSpec  # noqa: E402
from gateway.store.pg.migrate import migrate  # noqa: E402

URL = os.environ.get("ISTHMUS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
LISTENING = re.compile(r"^isthmus listening mllp=[^:]+:(\d+) http=[^:]+:(\d+)$")
API_KEY = "bench-key-" + secrets.token_hex(8)
VT, FS, CR = b"\x0b", b"\x1c", b"\r"
ADT = ("MSH|^~\\&|BENCHLAB|BENCHHOSP|ISTHMUS|HOSP|20261206080000||ADT^A01^ADT_A01|{cid}|P|2.5.1\r"
       "EVN|A01|20261206080000\r"
       "PID|1||MRN-{mrn}^^^BENCHHOSP^MR||Bench^Pat{mrn}||19800101|F\r"
       "PV1|1|I|W1^1^1\r")


@dataclass
class Instance:
    proc: subprocess.Popen[str]
    mllp: int
    http: int


def start(config: Path, data_dir: Path) -> Instance:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--mllp-port", "0",
         "--http-port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=open(data_dir.parent / f"{data_dir.name}.log", "w"),
        text=True, cwd=REPO_ROOT, env={**os.environ, "ISTHMUS_CONFIG": str(config),
                                        "PYTHONPATH": str(REPO_ROOT)})
    assert proc.stdout is not None
    match = LISTENING.match(proc.stdout.readline().strip())
    if match is None:
        proc.kill()
        raise SystemExit(f"a gateway did not start; see {data_dir.parent}")
    return Instance(proc, int(match[1]), int(match[2]))


async def mllp_lane(port: int, messages: Sequence[bytes]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    accepted = 0
    for raw in messages:
        writer.write(VT + raw + FS + CR)
        await writer.drain()
        reply = await reader.readuntil(FS + CR)
        accepted += b"MSA|AA" in reply
    writer.close()
    return accepted


async def ingest(instances: Sequence[Instance], total: int, connections: int,
                 run: str) -> tuple[float, int]:
    lanes = [[ADT.format(cid=f"{run}-{c}-{n}", mrn=f"{c:03d}{n:06d}").encode()
              for n in range(total // connections)] for c in range(connections)]
    started = time.perf_counter()
    accepted = await asyncio.gather(*(mllp_lane(instances[c % len(instances)].mllp, lane)
                                      for c, lane in enumerate(lanes)))
    return sum(accepted) / (time.perf_counter() - started), sum(accepted)


async def reads(instances: Sequence[Instance], total: int, connections: int) -> float:
    headers = {"X-API-Key": API_KEY, "Accept": "application/fhir+json"}
    async with aiohttp.ClientSession(headers=headers) as http:
        base = f"http://127.0.0.1:{instances[0].http}/fhir"
        async with http.get(f"{base}/Patient", params={"_count": "200"}) as response:
            ids = [e["resource"]["id"] for e in (await response.json()).get("entry", [])]
        if not ids:
            raise SystemExit("no patients to read (did the applier run?)")

        async def client(c: int) -> None:
            port = instances[c % len(instances)].http
            for n in range(total // connections):
                url = f"http://127.0.0.1:{port}/fhir/Patient/{ids[(c + n) % len(ids)]}"
                async with http.get(url) as response:
                    assert response.status == 200, response.status
                    await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(connections)))
        return total / (time.perf_counter() - started)


def config_text(backend: str, spec: PgSpec | None, keys: Path) -> str:
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    store = (f'[store]\nbackend = "postgresql"\nurl = "{spec.url}"\nschema = "{spec.schema}"\n'
             if spec is not None else '[store]\nsynchronous = "full"\n')
    return (store + f'[audit]\nkey_file = "{keys}/keys/audit-data.keys"\n'
            f'signing_key_file = "{keys}/keys/audit-signing.pem"\n'
            f'[[auth.api_keys]]\nname = "bench"\nkey_sha256 = "{digest}"\n'
            'scopes = ["system/*.rs"]\n[log]\nlevel = "warning"\n')


async def commits(spec: PgSpec | None) -> int:
    if spec is None:
        return 0
    connection = await asyncpg.connect(spec.url)
    try:
        return int(await connection.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await connection.close()


async def setup_row(label: str, count: int, spec: PgSpec | None, tmp: Path, keys: Path,
                    args: argparse.Namespace) -> tuple[str, float, float, float]:
    config = tmp / f"{label}.toml"
    config.write_text(config_text(label, spec, keys))
    instances = [start(config, tmp / f"{label}-{n}") for n in range(count)]
    try:
        await ingest(instances, 200, 2, f"warm{secrets.token_hex(2)}")
        before = await commits(spec)
        rate, accepted = await ingest(instances, args.messages, args.connections,
                                      secrets.token_hex(3))
        per_message = (await commits(spec) - before) / accepted if spec else 0.0
        await asyncio.sleep(2)  # the applier catches up before the reads
        read_rate = await reads(instances, args.reads, args.connections)
    finally:
        for instance in instances:
            instance.proc.terminate()
        for instance in instances:
            instance.proc.wait(30)
    return label, rate, read_rate, per_message


async def commit_ceiling(spec: PgSpec, seconds: float, clients: int,
                         locked: bool = True) -> float:
    """Commits/s of the inbox's one-row batch as the inbox commits it (`locked`): one
    transaction taking the patient's advisory lock, then its INSERT (unnest of arrays, ON
    CONFLICT on the dedup key), from `clients` connections (50 patients per client); or
    the INSERT alone, in autocommit (the peer: what the lock costs)."""
    from gateway.store.pg.inbox import _INSERT, _LOCK

    done = 0
    stop = time.perf_counter() + seconds

    async def client(c: int) -> None:
        nonlocal done
        connection = await asyncpg.connect(spec.url, server_settings={
            "search_path": spec.schema})
        n = 0
        while time.perf_counter() < stop:
            n += 1
            patient = f"p{c}-{n % 50}"
            row = (["2026-12-06T00:00:00.000000Z"], ["A"], ["F"], [f"{c}-{n}-{locked}"],
                   ["ADT^A01"], ["2.5.1"], ["peer"], [10], ["accepted"], [b"MSH"], [b"ACK"],
                   [f"A\x1fF\x1f{c}-{n}-{locked}"], [""], [""], [patient], [""], [None],
                   [None])
            if locked:
                async with connection.transaction():
                    await connection.execute(_LOCK, [patient])
                    await connection.execute(_INSERT, *row)
            else:
                await connection.execute(_INSERT, *row)
            done += 1
        await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return done / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    from gateway.app.audit import audit_keys
    from gateway.config import load_settings

    tmp = Path(tempfile.mkdtemp(prefix="isthmus-bench-pg-"))
    tmp.chmod(0o700)
    keys = tmp / "keys-home"
    audit_keys(load_settings(None, environ={}, overrides={"store.data_dir": keys}),
               create=True)
    rows = [] if args.ceiling_only else [
        await setup_row("sqlite", 1, None, tmp, keys, args)]
    specs: list[PgSpec] = []
    try:
        for count in (1, 2):
            spec = PgSpec(args.url, schema=f"bench_{secrets.token_hex(4)}")
            specs.append(spec)
            await migrate(spec)
            if not args.ceiling_only:
                rows.append(await setup_row(f"postgresql x{count}", count, spec, tmp, keys,
                                            args))
        ceiling, bare = {}, {}
        for c in (1, 8, 32):  # interleaved: the two see the same load
            ceiling[c] = await commit_ceiling(specs[0], args.seconds, c)
            bare[c] = await commit_ceiling(specs[0], args.seconds, c, locked=False)
    finally:
        connection = await asyncpg.connect(args.url)
        for spec in specs:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{spec.schema}" CASCADE')
        await connection.close()
    print("\ncommit ceiling: the inbox's one-row batch per transaction, as it commits it "
          "(BEGIN, the patient's advisory lock, INSERT, COMMIT) beside the INSERT alone")
    for clients, rate in ceiling.items():
        print(f"  {clients:>3} connections: {rate:>8.0f} commits/s   INSERT alone "
              f"{bare[clients]:>8.0f}/s   ratio {rate / bare[clients]:.2f}")
    if args.ceiling_only:
        return
    sqlite_mllp, sqlite_reads = rows[0][1], rows[0][2]
    print(f"\n{args.messages} ADT^A01 over {args.connections} lock-step MLLP connections, "
          f"{args.reads} FHIR reads over {args.connections} clients (spread over the "
          "instances); ratios are to SQLite in this run")
    print(f"{'setup':<16}{'MLLP msg/s':>12}{'ratio':>8}{'reads/s':>10}{'ratio':>8}"
          f"{'commits/msg':>13}")
    for label, rate, read_rate, per_message in rows:
        print(f"{label:<16}{rate:>12.0f}{rate / sqlite_mllp:>8.2f}{read_rate:>10.0f}"
              f"{read_rate / sqlite_reads:>8.2f}{per_message:>13.2f}")
    per_message = max(rows[1][3], 0.01)
    one = rows[1][1]
    limit = max(ceiling.values()) / per_message
    print(f"\nmodel: one instance needs {per_message:.2f} commits per message; the database "
          f"commits at most ~{max(ceiling.values()):.0f}/s here, so instances together top "
          f"out near {limit:.0f} msg/s, i.e. about {limit / one:.1f}x one instance "
          f"({one:.0f} msg/s) before the database, not the gateways, is the limit")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=URL)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--ceiling-only", action="store_true",
                        help="only the commit ceilings (no gateways)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="length of each commit-ceiling measurement")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
