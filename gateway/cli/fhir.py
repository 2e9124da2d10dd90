"""`isthmus fhir merge SOURCE TARGET`: two records of the FHIR store that are one
patient, merged as an ADT^A40 merges them (the same store code): SOURCE stays, inactive
and `replaced-by` TARGET; every reference to it and its identifiers move to TARGET.

It is how a conflict is resolved (two Patients sharing an identifier, from a race or an
earlier bug, leave every message naming it `identity-conflict`): merge, then
`isthmus inbox replay --failed`. It works on a stopped gateway's data directory (the
running gateway holds its lock), or with store.backend = "postgresql" in the shared
database beside running instances; the merge is on record in the audit trail first.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.access import record_accesses, who
from gateway.cli.shared import settings_from

if TYPE_CHECKING:
    from gateway.audit.record import AuditRecord
    from gateway.cli.shared import Subparsers
    from gateway.config import Settings
    from gateway.store.fhir import Indexer, Merge, MergeOutcome

_PATIENT = re.compile(r"Patient/([A-Za-z0-9\-.]{1,64})")


def add_parser(sub: Subparsers) -> None:
    fhir = sub.add_parser("fhir", help="the embedded FHIR store")
    fhir.add_argument("--data-dir", type=Path, help="where the store lives (store.data_dir)")
    fhir_sub = fhir.add_subparsers(metavar="ACTION")
    merge = fhir_sub.add_parser(
        "merge", help="merge one Patient into another (as ADT^A40 does); gateway stopped")
    merge.add_argument("source", help="the record merged away: Patient/<id>")
    merge.add_argument("target", help="the surviving record: Patient/<id>")
    merge.set_defaults(run=_merge)


def _merge(args: argparse.Namespace) -> int:
    from gateway.store.errors import DataDirError, StoreUnavailable, WriteConflict
    from gateway.store.sealing import SealError

    ids = [_PATIENT.fullmatch(text) for text in (args.source, args.target)]
    if ids[0] is None or ids[1] is None:
        print("isthmus fhir merge: name both records as Patient/<id>", file=sys.stderr)
        return 2
    source, target = ids[0].group(1), ids[1].group(1)
    if source == target:
        print("isthmus fhir merge: a record cannot be merged into itself", file=sys.stderr)
        return 2
    settings = settings_from(args, **{"store.data_dir": args.data_dir})
    refused = record_accesses(args, [_access(source), _access(target)])
    if refused is not None:
        print(f"isthmus fhir merge: {refused}; nothing was merged", file=sys.stderr)
        return 1
    try:
        outcome = asyncio.run(_run_merge(settings, source, target))
    except (DataDirError, StoreUnavailable, SealError) as exc:
        print(f"isthmus fhir merge: {exc}", file=sys.stderr)
        return 1
    except WriteConflict as exc:
        print(f"isthmus fhir merge: {exc.reason}", file=sys.stderr)
        return 1
    if not outcome.merged:
        print(f"isthmus fhir merge: Patient/{source} is not a current record; nothing was "
              "merged", file=sys.stderr)
        return 1
    print(f"merged {', '.join(outcome.merged)} into {outcome.target}: references moved in "
          f"{outcome.moved} resources")
    return 0


async def _run_merge(settings: Settings, source: str, target: str) -> MergeOutcome:
    from gateway.app.files import FHIR_FILE
    from gateway.app.sealing import store_codec
    from gateway.app.tables import search_registry
    from gateway.store.data_dir import claim
    from gateway.store.fhir import IdMatch, Merge, SearchQuery
    from gateway.store.fhir_sqlite import SqliteFhirStore

    merge = Merge("Patient", SearchQuery("Patient", ((IdMatch(source),),)), target)
    registry = search_registry(settings)
    if settings.store.backend == "postgresql":
        return await _merge_in_database(settings, merge, registry.index)
    data_dir = settings.store.data_dir
    lock = claim(data_dir)  # DataDirInUse while the gateway runs: merge on a stopped one
    try:
        store = await SqliteFhirStore.open(data_dir / FHIR_FILE, registry.index,
                                           codec=store_codec(settings),
                                           string_groups=registry.string_groups())
        try:
            return await store.merge(merge)
        finally:
            await store.close()
    finally:
        lock.release()


async def _merge_in_database(settings: Settings, merge: Merge, indexer: Indexer
                             ) -> MergeOutcome:
    """The merge in the shared database, beside running instances: its writes take the
    same per-resource advisory locks as theirs (no instance needs to stop)."""
    from gateway.cli.shared import database_pool
    from gateway.store.pg.connect import DATABASE_ERRORS, unavailable
    from gateway.store.pg.fhir import PgFhirStore

    try:
        async with database_pool(settings) as pool:
            store = await PgFhirStore.open(pool, indexer)
            try:
                return await store.merge(merge)
            finally:
                await store.close()
    except DATABASE_ERRORS as exc:
        raise unavailable("the database could not be reached", exc) from None


def _access(patient_id: str) -> AuditRecord:
    from gateway.audit.record import Action, AuditRecord

    user, host = who()
    return AuditRecord(Action.UPDATE, "success", client_id="isthmus-cli", user=user,
                       peer=host, resource_type="Patient", resource_id=patient_id,
                       patient=f"Patient/{patient_id}")
