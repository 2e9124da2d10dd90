"""Apply lag: from a message's ACK to its resources readable over /fhir (a benchmark).

What is measured
----------------
The gateway (``python -m gateway serve``, started here on a temp data dir, with
``--workers N`` when given) takes ``--messages`` synthetic ADT^A01 messages, each about a
new patient, over ``--connections`` lock-step MLLP connections; the time of every ACK is
kept. Meanwhile ``GET /fhir/Provenance?_summary=count`` is polled every ``--poll`` seconds
(each message writes exactly one Provenance, so the count is the number applied). The
messages are applied in inbox order, which is ACK order to within the connections'
interleaving, so the k-th ACK's lag is the first poll that saw k applied minus that ACK's
time. Printed: the ACK rate and p50/p99 ACK latency, the apply rate, the lag's p50, p99
and max, and the time from the last ACK until everything was applied; and the CPU
(user+system, from /proc) the edge and the apply workers used over the run, per message.

Also printed: how many rows the workers translated again (`isthmus.worker.translated_again`):
none kept for them. The edge listens once its translators are ready and holds what they
translate for an apply worker still starting, so that is 0 from the first message (it
was hundreds when the children started after the edge listened); `--settle 25` waits
before the burst anyway (the workers' start off the figures: the steady state).

The peer, in the same run: the poll's own round trip (p50/p99), the floor under any lag
this can see (a lag below it reads as the poll's resolution).

    python bench/apply_lag.py --messages 3000 --connections 8
    python bench/apply_lag.py --workers 0          # the edge applies in its own process
    python bench/apply_lag.py --profile            # and where each process spends its CPU
    python bench/apply_lag.py --mix oru            # ADT^A01 and ORU^R01 alternated
    python bench/apply_lag.py --postgres postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from profiles import Profiles, cpu_seconds, gateway_processes

KEY = "bench-apply-lag-key"
LISTENING = re.compile(r"mllp=[^:]+:(\d+) http=[^:]+:(\d+)")
TEMPLATE = (
    "MSH|^~\\&|BENCHAPP|BENCHFAC|ISTHMUS|GATEWAY|20261126083000||ADT^A01^ADT_A01|{cid}|P|2.5.1\r"
    "EVN|A01|20261126082900\r"
    "PID|1||MRN-{n}^^^BENCHFAC^MR||FAMILY{n}^Given^Middle||19800102|F|||"
    "1 Example Street^^Springfield^ST^12345^USA||^PRN^PH^^1^555^0100001\r"
    "PV1|1|I|WARD1^101^A^BENCHFAC||||1234^Attending^Alex|||MED||||ADM|||||VN-{n}\r")
# `--mix oru`: every other message a lab result (10 OBX) for a new patient instead.
ORU_TEMPLATE = (
    "MSH|^~\\&|BENCHLAB|BENCHFAC|ISTHMUS|GATEWAY|20261126083000||ORU^R01^ORU_R01|{cid}|P|2.5.1\r"
    "PID|1||MRN-{n}^^^BENCHFAC^MR||FAMILY{n}^Given||19800102|F\r"
    "ORC|RE|PLC-{n}^BENCHEHR|FIL-{n}^BENCHLAB||CM\r"
    "OBR|1|PLC-{n}^BENCHEHR|FIL-{n}^BENCHLAB|24323-8^Comprehensive metabolic panel^LN|||"
    "20261126080000|||||||||1234^Orderer^Olu||||||20261126090000|||F\r"
    + "".join(f"OBX|{i}|NM|2345-7^Glucose^LN||{90 + i}|mg/dL^mg/dL^UCUM|70-99|N|||F|||"
              "20261126080000\r" for i in range(1, 11)))


def message(n: int, name: str, mix: str) -> bytes:
    """The n-th message of the run, `name` its control id and its new patient's: an
    ADT^A01, or with `--mix oru` every odd one an ORU^R01."""
    template = ORU_TEMPLATE if mix == "oru" and n % 2 else TEMPLATE
    return template.format(cid=name, n=name).encode()


def gateway_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the edge and of each apply worker (`profiles.gateway_processes`)."""
    return {role: cpu_seconds(process) for role, process in gateway_processes(pid)
            if role == "edge" or role.startswith("worker ")}


def frame(payload: bytes) -> bytes:
    return b"\x0b" + payload + b"\x1c\r"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] if ordered else 0.0


def start_gateway(workdir: Path, workers: int | None, store: str = ""
                  ) -> tuple[subprocess.Popen[str], int, int]:
    """`store`: more configuration (`postgres_store`'s), before the API key."""
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    config = workdir / "isthmus.toml"
    config.write_text(store + f'[[auth.api_keys]]\nname = "bench"\nkey_sha256 = "{digest}"\n'
                      'scopes = ["system/*.rs"]\n')
    data = workdir / "var"
    argv = [sys.executable, "-m", "gateway", "--config", str(config), "serve", "--host",
            "127.0.0.1", "--mllp-port", "0", "--http-port", "0", "--data-dir", str(data)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    log = (workdir / "gateway.log").open("w")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = LISTENING.search(line)
    if match is None:
        proc.kill()
        raise SystemExit(f"the gateway did not start: {line!r}; see {workdir}/gateway.log")
    return proc, int(match[1]), int(match[2])


def postgres_store(url: str, workdir: Path) -> tuple[str, str]:
    """(configuration, schema) for a gateway on a new schema of the database at `url`, with
    audit keys made in `workdir` (the schema is dropped by `drop_schema`)."""
    from gateway.app.audit import audit_keys
    from gateway.config import load_settings

    keys = workdir / "keys-home"
    audit_keys(load_settings(None, environ={}, overrides={"store.data_dir": keys}),
               create=True)
    schema = f"bench_lag_{os.getpid()}"
    return (f'[store]\nbackend = "postgresql"\nurl = "{url}"\nschema = "{schema}"\n'
            f'[audit]\nkey_file = "{keys}/keys/audit-data.keys"\n'
            f'signing_key_file = "{keys}/keys/audit-signing.pem"\n'), schema


async def drop_schema(url: str, schema: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


async def client(port: int, numbers: list[int], prefix: str, acks: dict[int, float],
                 latencies: list[float], mix: str = "none") -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for n in numbers:
            payload = message(n, f"{prefix}{n}", mix)
            sent = time.perf_counter()
            writer.write(frame(payload))
            reply = await reader.readuntil(b"\x1c\r")
            done = time.perf_counter()
            if b"MSA|AA|" not in reply and b"MSA|CA|" not in reply:
                raise SystemExit(f"not acknowledged: {reply[:200]!r}")
            acks[n] = done
            latencies.append(done - sent)
    finally:
        writer.close()


async def poll(session: aiohttp.ClientSession, url: str, seen: list[tuple[float, int]],
               rounds: list[float], total: int, stop: asyncio.Event, every: float) -> None:
    while True:
        started = time.perf_counter()
        async with session.get(url) as response:
            count = int((await response.json(content_type=None))["total"])
        now = time.perf_counter()
        rounds.append(now - started)
        seen.append((now, count))
        if count >= total and stop.is_set():
            return
        await asyncio.sleep(every)


async def translated_again(session: aiohttp.ClientSession, url: str) -> int:
    """`isthmus.worker.translated_again` summed over the workers: rows whose translation
    for the ACK was not handed on (made by the edge while no translator was ready)."""
    async with session.get(url) as response:
        text = await response.text()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("isthmus_worker_translated_again"))


async def measure(args: argparse.Namespace, mllp: int, http: int, pid: int) -> None:
    prefix = f"L{os.getpid()}-"
    numbers = list(range(args.messages))
    acks: dict[int, float] = {}
    latencies: list[float] = []
    seen: list[tuple[float, int]] = []
    rounds: list[float] = []
    stop = asyncio.Event()
    url = f"http://127.0.0.1:{http}/fhir/Provenance?_summary=count"
    async with aiohttp.ClientSession(headers={"X-API-Key": KEY}) as session:
        cpu_before = gateway_cpu(pid)
        profiles = Profiles(gateway_processes(pid)) if args.profile else None
        poller = asyncio.create_task(poll(session, url, seen, rounds, args.messages, stop,
                                          args.poll))
        started = time.perf_counter()
        shares = [numbers[i::args.connections] for i in range(args.connections)]
        await asyncio.gather(*(client(mllp, share, prefix, acks, latencies, args.mix)
                               for share in shares))
        acked = time.perf_counter()
        stop.set()
        await asyncio.wait_for(poller, args.timeout)
        cpu_after = gateway_cpu(pid)
        profile = profiles.stop() if profiles is not None else ""
        again = await translated_again(session, f"http://127.0.0.1:{http}/metrics")
    applied_at = seen[-1][0]
    order = sorted(acks.values())
    lags = []
    position = 0
    for k, ack_time in enumerate(order, start=1):
        while seen[position][1] < k:
            position += 1
        lags.append(max(0.0, seen[position][0] - ack_time))
    first_count = next((t for t, c in seen if c >= 1), started)
    print(f"messages {args.messages}  connections {args.connections}  "
          f"workers {'default' if args.workers is None else args.workers}  "
          f"{'ADT^A01 and ORU^R01 (10 OBX) alternated' if args.mix == 'oru' else 'ADT^A01'}")
    print(f"ACKs      {args.messages / (acked - started):8.0f} msg/s   "
          f"p50 {percentile(latencies, 50) * 1000:7.2f} ms   "
          f"p99 {percentile(latencies, 99) * 1000:7.2f} ms")
    print(f"applied   {args.messages / max(applied_at - first_count, 1e-9):8.0f} msg/s   "
          f"all applied {applied_at - acked:6.2f} s after the last ACK")
    print(f"lag       p50 {percentile(lags, 50) * 1000:8.1f} ms   "
          f"p99 {percentile(lags, 99) * 1000:8.1f} ms   max {max(lags) * 1000:8.1f} ms")
    print(f"peer      poll round trip p50 {percentile(rounds, 50) * 1000:.2f} ms   "
          f"p99 {percentile(rounds, 99) * 1000:.2f} ms (the lag's resolution)")
    for name, after in cpu_after.items():
        used = after - cpu_before.get(name, 0.0)
        print(f"cpu       {name}: {used:6.2f} s = {used / args.messages * 1e6:6.0f} us/msg")
    print(f"again     rows the workers translated again (no translation kept): {again}")
    if profile:
        print(profile)
    print("target: lag <= 1000 ms at >= 3000 msg/s: "
          f"{'PASS' if max(lags) <= 1 and args.messages / (acked - started) >= 3000 else 'MISS'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None)
    # Each poll is a search the edge answers: at 20 ms it took ~20 % off the ACK rate.
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between polls")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--keep-tmp", action="store_true")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to wait after the gateway listens, so the translators "
                             "and workers are ready (steady state)")
    parser.add_argument("--mix", choices=("none", "oru"), default="none",
                        help="oru: every other message an ORU^R01 with 10 OBX (each message "
                             "writes one Provenance either way)")
    parser.add_argument("--postgres", metavar="URL", default="",
                        help="store on PostgreSQL at URL (a new schema, dropped after; "
                             "the edge applies in its own process there)")
    parser.add_argument("--profile", action="store_true",
                        help="sample every gateway process with py-spy over the run and "
                             "print each one's top functions (bench/profiles.py)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="isthmus-lag-"))
    os.chmod(workdir, 0o700)
    store, schema = postgres_store(args.postgres, workdir) if args.postgres else ("", "")
    proc, mllp, http = start_gateway(workdir, args.workers, store)
    try:
        # The apply workers may still be starting when the edge listens (seconds, over
        # 10 s on a loaded machine): their rows wait, so the first lags include that.
        time.sleep(args.settle)
        asyncio.run(measure(args, mllp, http, proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if schema:
            asyncio.run(drop_schema(args.postgres, schema))
        if not args.keep_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
