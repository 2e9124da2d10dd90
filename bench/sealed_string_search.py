"""Sealed FHIR store: string searches (names, addresses) on blind prefix rows.

    python bench/sealed_string_search.py [--patients 2000] [--seconds 1] [--plain]

Fills a sealed SQLite FHIR store (a fresh temp dir, `synchronous = normal`) with synthetic
patients whose names and addresses repeat across parameters, then times
`SqliteFhirStore.search` (with its total) for a few string searches: microseconds a search
and what it found. A grouped parameter (`family` within `name`, `address-city` within
`address`) looks up each label of its group holding it (`store/fhir_sqlite/blinding.py`),
one index probe each; an :exact search goes to its value's rows by the value's normalised
(blinded) form. `--plain`: the same on a store not sealed. Run it from another checkout
(its directory first on sys.path, as from there) to compare: the found counts must be
equal, the times are the comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path.cwd()))

from gateway.config import load_settings  # noqa: E402
from gateway.fhir.search.index import normalize  # noqa: E402
from gateway.store.data_keys import parse_keys  # noqa: E402
from gateway.store.fhir import SearchQuery, StringMatch, WriteRequest  # noqa: E402
from gateway.store.sealing import PLAIN, SealedCodec  # noqa: E402

try:  # this tree
    from gateway.app.tables import search_registry
    from gateway.store.fhir_sqlite import SqliteFhirStore
    GROUPED = True
except ImportError:  # a checkout from before the shared rows (34191a6 and earlier)
    from gateway.app.specs import search_registry  # type: ignore[no-redef]
    from gateway.store import SqliteFhirStore  # type: ignore[no-redef,attr-defined]
    GROUPED = False

FAMILIES = ["Smith", "Jones", "Taylor", "Brown", "Wilson", "Evans", "Thomas", "Roberts",
            "Walker", "Wright"]
GIVEN = ["Ann", "Bob", "Cara", "Dan", "Eve", "Finn", "Gail", "Hugo"]
CITIES = ["Springfield", "Shelbyville", "Ogdenville"]
SEARCHES = [("family", "smith1"), ("given", "ann"), ("name", "wil"),
            ("address-city", "spring"), ("address", "shelby"), ("family", "robertsxyz"),
            ("family:exact", "Smith1"), ("given:exact", "Ann"),
            ("address-city:exact", "Springfield"), ("family:exact", "Robertsxyz")]


def string_match(name: str, value: str) -> StringMatch:
    """`name=value` as the search parser makes it, in this tree's form."""
    param, _, modifier = name.partition(":")
    if not modifier:
        return StringMatch(param, value)
    try:  # with the lookup key the index finds the value's rows by
        return StringMatch(param, value, "exact", (normalize(value),))  # type: ignore[call-arg]
    except TypeError:  # a tree from before the key: exact alone
        return StringMatch(param, value, "exact")


def synthetic_patient(n: int) -> dict[str, Any]:
    return {"resourceType": "Patient",
            "identifier": [{"system": "urn:bench:mrn", "value": f"M{n}"}],
            "name": [{"family": f"{FAMILIES[n % 10]}{n % 37}",
                      "given": [GIVEN[n % 8], GIVEN[(n // 8) % 8]]}],
            "address": [{"line": [f"{n} Main St"], "city": CITIES[n % 3], "state": "ST",
                         "postalCode": f"{10000 + n % 97}", "country": "USA"}]}


async def measure(patients: int, seconds: float, plain: bool) -> None:
    registry = search_registry(load_settings(None, environ={}))
    codec = PLAIN if plain else SealedCodec(
        parse_keys("k1 " + base64.b64encode(b"1" * 32).decode(), "bench"), "k1")
    groups = {"string_groups": registry.string_groups()} if GROUPED else {}
    with tempfile.TemporaryDirectory(prefix="isthmus-strings-") as directory:
        store = await SqliteFhirStore.open(Path(directory) / "fhir.db", registry.index,
                                           codec=codec, synchronous="normal", **groups)
        try:
            for start in range(0, patients, 100):
                await store.transact([WriteRequest("POST", "Patient",
                                                   resource=synthetic_patient(n))
                                      for n in range(start, min(patients, start + 100))])
            for param, value in SEARCHES:
                query = SearchQuery("Patient", ((string_match(param, value),),), count=20)
                count, started, found = 0, time.perf_counter(), 0
                while time.perf_counter() - started < seconds:
                    page = await store.search(query, total=True)
                    count, found = count + 1, page.total or 0
                elapsed = (time.perf_counter() - started) / count * 1e6
                print(f"{param + '=' + value:<32} {elapsed:8.0f} us a search   {found:5d} found")
        finally:
            await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--plain", action="store_true", help="a store not sealed")
    args = parser.parse_args()
    asyncio.run(measure(args.patients, args.seconds, args.plain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
