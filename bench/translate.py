"""Translation speed: HL7 v2 message in, FHIR R4 transaction Bundle JSON out, on one core.

    python bench/translate.py [--seconds S] [--no-peer]

For each message type it prints translations per second and the time per message for
Isthmus (parse + translate through the compiled tables + Bundle + JSON bytes), with the
tables as the gateway runs them (generated Python source, loaded from the cache by the
tables' hash) and, in the same run, as the compiler's closures (`--interpreted`, the
engine before the tables were generated as source, and its fallback). In the same run it
also measures the PyPI package hl7v2-fhir-bridge on the message types it supports (ADT,
ORM, ORU), installed in its own virtual environment under bench/.peer-venv (created on
first use; not a dependency of Isthmus), once with its default pipeline (convert +
fhir.resources validation) and once convert-only, and prints the ratio. A last row,
"ADT^A01, new patients", cycles through 1,000 ADT^A01 for 1,000 different patients (doctors
and wards from small pools): what is kept across messages helps it only as real traffic would.

Targets (issues 3 and 15): >= 10,000 ADT^A01/s and >= 5,000 ORU^R01 (10 OBX)/s on one core.
Messages are synthetic.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEER_VENV = ROOT / "bench" / ".peer-venv"
PEER_PACKAGE = "hl7v2-fhir-bridge==0.1.0"

MSH = "MSH|^~\\&|SYNTHADT|SYNTHHOSP|ISTHMUS|GATEWAY|20261126083000+0100||{type}|{id}|P|2.5.1"

ADT_A01 = "\r".join([
    MSH.format(type="ADT^A01^ADT_A01", id="BENCH-ADT-1"),
    "EVN|A01|20261126082900+0100",
    "PID|1||MRN-100001^^^SYNTHHOSP^MR~SSN-000^^^SSA^SS||CANARYFAMILY^Jane^Quinn^^Dr^^L~"
    "CANARYALIAS^J^^^^^A||19800102|F|||12 Example Street^Apt 4^Springfield^ST^12345^USA^H~"
    "PO Box 9^^Springfield^ST^12345^USA^M||^PRN^PH^^1^555^0100001~^NET^Internet^"
    "jane@example.invalid|^WPN^PH^^1^555^0100002|en^English^ISO639|M^Married^HL70002|||"
    "999-00-0000",
    "NK1|1|CANARYFAMILY^John|SPO^Spouse^HL70063|12 Example Street^^Springfield^ST^12345|"
    "^PRN^PH^^1^555^0100003",
    "PV1|1|I|WARD1^101^A^SYNTHHOSP||||1234^Attending^Alex^^^Dr|5678^Referring^Rae|||MED||||"
    "ADM|||9012^Admitting^Ari|||VN-0001^^^SYNTHHOSP^VN|||||||||||||||||||||||||"
    "20261126082900+0100",
    "AL1|1|DA|PCN^Penicillin^L|SV|Hives",
    "DG1|1||I10^Essential hypertension^I10||20261126|A",
]) + "\r"

ORU_R01 = "\r".join([
    MSH.format(type="ORU^R01^ORU_R01", id="BENCH-ORU-1"),
    "PID|1||MRN-100001^^^SYNTHHOSP^MR||CANARYFAMILY^Jane||19800102|F",
    "PV1|1|O|CLINIC1",
    "ORC|RE|PLC-1^SYNTHEHR|FIL-1^SYNTHLAB||CM",
    "OBR|1|PLC-1^SYNTHEHR|FIL-1^SYNTHLAB|24323-8^Comprehensive metabolic panel^LN|||"
    "20261126080000+0100|||||||||1234^Orderer^Olu||||||20261126090000+0100|||F",
    *[f"OBX|{n}|NM|{code}^{name}^LN||{value}|{unit}^{unit}^UCUM|{ref}|{flag}|||F|||"
      "20261126080000+0100"
      for n, (code, name, value, unit, ref, flag) in enumerate([
          ("2345-7", "Glucose", "95", "mg/dL", "70-99", "N"),
          ("2160-0", "Creatinine", "1.10", "mg/dL", "0.6-1.3", "N"),
          ("3094-0", "Urea nitrogen", "18", "mg/dL", "7-20", "N"),
          ("2951-2", "Sodium", "141", "mmol/L", "136-145", "N"),
          ("2823-3", "Potassium", "5.6", "mmol/L", "3.5-5.1", "H"),
          ("2075-0", "Chloride", "101", "mmol/L", "98-107", "N"),
          ("2028-9", "Carbon dioxide", "24", "mmol/L", "22-29", "N"),
          ("17861-6", "Calcium", "9.6", "mg/dL", "8.6-10.3", "N"),
          ("2885-2", "Protein", "7.1", "g/dL", "6.0-8.3", "N"),
          ("1751-7", "Albumin", "4.2", "g/dL", "3.5-5.2", "N"),
      ], 1)],
]) + "\r"

ORM_O01 = "\r".join([
    MSH.format(type="ORM^O01^ORM_O01", id="BENCH-ORM-1"),
    "PID|1||MRN-100001^^^SYNTHHOSP^MR||CANARYFAMILY^Jane||19800102|F",
    "PV1|1|O|CLINIC1",
    "ORC|NW|PLC-2^SYNTHEHR|FIL-2^SYNTHRIS||SC||||20261126080000+0100|||1234^Orderer^Olu",
    "OBR|1|PLC-2^SYNTHEHR|FIL-2^SYNTHRIS|71045^Chest X-ray 1 view^C4|||"
    "20261126080000+0100|||||||||1234^Orderer^Olu",
]) + "\r"

SIU_S12 = "\r".join([
    MSH.format(type="SIU^S12^SIU_S12", id="BENCH-SIU-1"),
    "SCH|APT-1^SYNTHEHR|APT-1F^SYNTHSCHED|||||ROUTINE^Routine visit|CHECKUP^Check-up|30|min|"
    "^^30^20261201090000+0100^20261201093000+0100|||||1234^Scheduler^Sam|||||||||Booked",
    "PID|1||MRN-100001^^^SYNTHHOSP^MR||CANARYFAMILY^Jane||19800102|F",
    "RGS|1",
    "AIS|1||CHECKUP^Check-up|20261201090000+0100|||30|min",
    "AIP|1||1234^Attending^Alex|PRACT",
    "AIL|1||CLINIC1^^^SYNTHHOSP",
]) + "\r"

VXU_V04 = "\r".join([
    MSH.format(type="VXU^V04^VXU_V04", id="BENCH-VXU-1"),
    "PID|1||MRN-100001^^^SYNTHHOSP^MR||CANARYFAMILY^Jane||19800102|F",
    "ORC|RE||IMM-1^SYNTHEHR",
    "RXA|0|1|20261126090000+0100|20261126090000+0100|141^Influenza, seasonal^CVX|0.5|mL^mL^UCUM"
    "||00^New record^NIP001|1234^Nurse^Nia|||||LOT-123|20271231|SKB^GlaxoSmithKline^MVX|||CP|A",
    "RXR|C28161^Intramuscular^NCIT|LD^Left deltoid^HL70163",
]) + "\r"

MESSAGES: dict[str, str] = {
    "ADT^A01": ADT_A01, "ORU^R01 (10 OBX)": ORU_R01, "ORM^O01": ORM_O01,
    "SIU^S12": SIU_S12, "VXU^V04": VXU_V04,
}
PEER_SUPPORTS = ("ADT^A01", "ORU^R01 (10 OBX)", "ORM^O01")
# A row that is not one message repeated: every message a new patient (name, MRN, birth
# date, address, phone, visit number, control id), its doctors and wards from small pools
# as a hospital's are. What the engine keeps across messages (converted values, ids of
# referred-to doctors and wards) hits only as often as real traffic lets it.
NEW_PATIENTS = "ADT^A01, new patients"
_FAMILIES = ("ALDERTON", "BRISCOE", "CALLOWAY", "DENHOLM", "EVERLEIGH", "FAIRWEATHER")
_GIVENS = ("Ash", "Blair", "Corin", "Dana", "Emery", "Finley", "Gale")


def new_patient_messages(count: int = 1000) -> list[str]:
    """`count` ADT^A01 like ADT_A01, each for another synthetic patient."""
    messages = []
    for n in range(count):
        family, given = _FAMILIES[n % 6] + str(n), _GIVENS[n % 7]
        doctor, ward = 1000 + n % 40, n % 12
        messages.append("\r".join([
            MSH.format(type="ADT^A01^ADT_A01", id=f"BENCH-ADT-{n}"),
            "EVN|A01|20261126082900+0100",
            f"PID|1||MRN-{200000 + n}^^^SYNTHHOSP^MR~SSN-{n:03d}^^^SSA^SS||{family}^{given}^Q"
            f"^^Dr^^L||19{50 + n % 50}{1 + n % 12:02d}{1 + n % 28:02d}|{'FM'[n % 2]}|||"
            f"{n} Example Street^Apt {n % 9}^Springfield^ST^{10000 + n}^USA^H||"
            f"^PRN^PH^^1^555^{n:07d}~^NET^Internet^p{n}@example.invalid|"
            f"^WPN^PH^^1^555^{n + 1:07d}|en^English^ISO639|M^Married^HL70002",
            f"NK1|1|{family}^Kin{n}|SPO^Spouse^HL70063|{n} Example Street^^Springfield^ST"
            f"^{10000 + n}|^PRN^PH^^1^555^{n + 2:07d}",
            f"PV1|1|I|WARD{ward}^{100 + n % 30}^A^SYNTHHOSP||||{doctor}^Attending{doctor}"
            f"^Alex^^^Dr|{doctor + 1}^Referring^Rae|||MED||||ADM|||{doctor + 2}^Admitting^Ari"
            f"|||VN-{n:06d}^^^SYNTHHOSP^VN|||||||||||||||||||||||||20261126082900+0100",
            "AL1|1|DA|PCN^Penicillin^L|SV|Hives",
            "DG1|1||I10^Essential hypertension^I10||20261126|A",
        ]) + "\r")
    return messages


def rate(work: Callable[[], object], seconds: float) -> tuple[float, float]:
    """(operations per second, microseconds per operation), after a short warm-up."""
    for _ in range(50):
        work()
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(100):
            work()
        count += 100
        now = time.perf_counter()
        if now >= deadline:
            break
    elapsed = now - start
    return count / elapsed, elapsed / count * 1e6


def measure_isthmus(seconds: float, generated: bool = True
                    ) -> dict[str, tuple[float, float] | str]:
    from gateway.config.cache import compiled_tables_dir
    from gateway.fhir.bundle import dumps, to_bundle
    from gateway.hl7.message import parse_message
    from gateway.mapping.engine import Translator
    from gateway.mapping.errors import TranslationError

    translator = Translator.load(cache=compiled_tables_dir(), generate=generated)
    if translator.generated != generated:
        sys.exit("the tables did not load as generated source (is the cache writable?)")
    results: dict[str, tuple[float, float] | str] = {}
    for name, text in MESSAGES.items():
        raw = text.encode()
        try:
            translator.translate(parse_message(raw))
        except TranslationError as exc:
            results[name] = f"not translated: {exc}"
            continue

        def work(raw: bytes = raw) -> bytes:
            return dumps(to_bundle(translator.translate(parse_message(raw))))
        results[name] = rate(work, seconds)
    varied = [text.encode() for text in new_patient_messages()]
    turn = iter(range(1 << 62))

    def new_patient() -> bytes:
        raw = varied[next(turn) % len(varied)]
        return dumps(to_bundle(translator.translate(parse_message(raw))))
    results[NEW_PATIENTS] = rate(new_patient, seconds)
    return results


PEER_SCRIPT = r"""
import json, sys, time
from datetime import datetime, timezone
from v2fhir.config import Config
from v2fhir.convert import convert
from v2fhir.hl7.parser import parse_bytes
from v2fhir.validate import validate_bundle

def rate(work, seconds):
    for _ in range(20):
        work()
    count, start = 0, time.perf_counter()
    while True:
        for _ in range(20):
            work()
        count += 20
        now = time.perf_counter()
        if now - start >= seconds:
            return count / (now - start), (now - start) / count * 1e6

messages = json.load(open(sys.argv[1]))
seconds = float(sys.argv[2])
cfg = Config()
now = datetime(2026, 11, 26, tzinfo=timezone.utc)
out = {}
for name, text in messages.items():
    raw = text.encode()
    try:
        convert(parse_bytes(raw), cfg, now)
    except Exception as exc:
        out[name] = {"error": type(exc).__name__ + ": " + str(exc)[:120]}
        continue
    def convert_only(raw=raw):
        return json.dumps(convert(parse_bytes(raw), cfg, now).bundle)
    def default_pipeline(raw=raw):
        bundle = convert(parse_bytes(raw), cfg, now).bundle
        validate_bundle(bundle)
        return json.dumps(bundle)
    out[name] = {"default": rate(default_pipeline, seconds),
                 "convert_only": rate(convert_only, seconds)}
print(json.dumps(out))
"""


def peer_python() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEER_VENV.relative_to(ROOT)} with {PEER_PACKAGE} ...", file=sys.stderr)
        venv.create(PEER_VENV, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", PEER_PACKAGE],
                       check=True)
    return python


def measure_peer(seconds: float) -> dict[str, dict[str, object]]:
    python = peer_python()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({name: MESSAGES[name] for name in PEER_SUPPORTS}, handle)
    try:
        done = subprocess.run([str(python), "-c", PEER_SCRIPT, handle.name, str(seconds)],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    finally:
        os.unlink(handle.name)
    result: dict[str, dict[str, object]] = json.loads(done.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--no-peer", action="store_true", help="skip hl7v2-fhir-bridge")
    parser.add_argument("--no-interpreted", action="store_true",
                        help="skip the tables run as closures")
    args = parser.parse_args()

    ours = measure_isthmus(args.seconds)
    closures = {} if args.no_interpreted else measure_isthmus(args.seconds, generated=False)
    peer = {} if args.no_peer else measure_peer(args.seconds)
    print(f"{'message type':<24} {'isthmus msg/s':>14} {'us/msg':>8} | "
          f"{'interpreted':>11} {'x':>5} | "
          f"{'bridge msg/s':>12} {'(no validation)':>15} | {'ratio':>6} {'(vs no val.)':>12}")
    for name in [*MESSAGES, NEW_PATIENTS]:
        mine = ours[name]
        if isinstance(mine, str):
            print(f"{name:<24} {mine}")
            continue
        line = f"{name:<24} {mine[0]:>14,.0f} {mine[1]:>8.1f} |"
        before = closures.get(name)
        if isinstance(before, tuple):
            line += f" {before[0]:>11,.0f} {mine[0] / before[0]:>5.2f} |"
        else:
            line += f" {'-':>11} {'':>5} |"
        theirs = peer.get(name)
        if theirs is None:
            line += f" {'-':>12} {'-':>15} |"
        elif "error" in theirs:
            line += f" {'error':>12} {str(theirs['error'])[:15]:>15} |"
        else:
            default = theirs["default"]
            only = theirs["convert_only"]
            assert isinstance(default, list) and isinstance(only, list)
            line += (f" {default[0]:>12,.0f} {only[0]:>15,.0f} | {mine[0] / default[0]:>5.1f}x "
                     f"{mine[0] / only[0]:>11.1f}x")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
