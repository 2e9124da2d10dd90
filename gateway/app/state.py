"""What the application holds (typed AppKeys); its files in the data dir: `files`."""

from __future__ import annotations

from aiohttp import web

from gateway.app.forwarding import Forwarding
from gateway.app.workers import Workers
from gateway.config import Settings
from gateway.edge import http
from gateway.edge.mllp import MllpServer
from gateway.fhir.search import SearchRegistry
from gateway.ingest.worker import Applier
from gateway.mapping.engine import Translator
from gateway.policy.profiles import Profile
from gateway.store.fhir import FhirStore
from gateway.store.pg.connect import PgSpec
from gateway.store.refusals_sqlite import SqliteRefusals
from gateway.store.sealing import RowCodec

SETTINGS = web.AppKey("settings", Settings)
TELEMETRY = http.TELEMETRY  # the edge's /metrics route reads it too
MLLP = web.AppKey("mllp", MllpServer)
MLLP_ADDRESS = web.AppKey("mllp_address", tuple)
TRANSLATOR = web.AppKey("translator", Translator)
# Applies committed translations: in this process, or the apply workers (app/workers.py).
APPLIER = web.AppKey("applier", Applier)
# The apply worker processes, when there are any (their figures for /metrics).
WORKERS = web.AppKey("workers", Workers)
PROFILES = web.AppKey("profiles", dict[str, Profile])
FORWARDING = web.AppKey("forwarding", Forwarding)
# Opened by one cleanup context and used by the ones after it.
FHIR_STORE = web.AppKey("fhir_store", FhirStore)
SEARCH_REGISTRY = web.AppKey("search_registry", SearchRegistry)
REFUSALS = web.AppKey("refusals", SqliteRefusals)
# store.backend = "postgresql": how to reach the database, and the pool every store shares
# (an asyncpg pool; asyncpg has no type information).
DATABASE = web.AppKey("database", PgSpec)
POOL = web.AppKey("pool", object)
# How the stores seal PHI at rest (decided with the data dir, before any store opens).
CODEC: web.AppKey[RowCodec] = web.AppKey("codec")
