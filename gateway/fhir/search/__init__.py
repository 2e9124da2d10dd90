"""FHIR R4 search: the parameter table (`params`), the indexer the store runs on every write
(`index`), and the parsing of a search request into the store's `SearchQuery` (`query`),
joined by the `SearchRegistry` (`registry`).

The parameters are rows of `mappings/search-parameters.csv`, checked against the R4 model
and compiled once into per-type extractors, so indexing and parsing stay cheap. Errors name
the parameter and the rule, never a value: search values are PHI.
"""

from gateway.fhir.errors import SearchError, SearchTableError, UnsupportedFormat
from gateway.fhir.search.index import (
    MAX_INSTANT,
    MIN_INSTANT,
    date_range,
    normalize,
    normalize_contact,
    reference_target,
)
from gateway.fhir.search.params import (
    COLUMNS,
    PARAM_TYPES,
    TABLE,
    ParamType,
    SearchParameter,
)
from gateway.fhir.search.query import MAX_VALUES, PREFIXES, Include, ParsedSearch
from gateway.fhir.search.registry import UNRESOLVED, SearchRegistry

__all__ = [
    "COLUMNS", "MAX_INSTANT", "MAX_VALUES", "MIN_INSTANT", "PARAM_TYPES", "PREFIXES", "TABLE",
    "Include", "ParamType", "ParsedSearch", "SearchError", "SearchParameter", "SearchRegistry",
    "SearchTableError", "UNRESOLVED", "UnsupportedFormat", "date_range", "normalize",
    "normalize_contact", "reference_target",
]
