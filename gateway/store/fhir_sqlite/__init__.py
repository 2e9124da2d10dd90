"""The embedded FHIR resource store on SQLite: `schema` (tables, triggers, the writer
connection), `sql` (a SearchQuery as SQL), `writes` (one FHIR transaction resolved and
written on the writer thread) and `store` (`SqliteFhirStore`: group commit, readers,
lifecycle)."""

from gateway.store.fhir_sqlite.store import SqliteFhirStore
from gateway.store.fhir_sqlite.writes import Outcomes

__all__ = ["Outcomes", "SqliteFhirStore"]
