"""What the application holds (typed AppKeys) and where it keeps its files."""

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
from gateway.store.fhir_sqlite import SqliteFhirStore

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
FHIR_STORE = web.AppKey("fhir_store", SqliteFhirStore)
SEARCH_REGISTRY = web.AppKey("search_registry", SearchRegistry)

# In the data dir.
INBOX_FILE = "inbox.db"
FHIR_FILE = "fhir.db"
AUTH_FILE = "auth.db"  # the client assertion ids already used (replay protection)
KEYS_DIR = "keys"
