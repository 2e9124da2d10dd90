"""The tables the settings name, loaded: the mapping tables and the search parameters.

Every process that translates or applies loads them (the edge, apply workers,
translators, some commands); on their own here, so that loading them imports nothing of
the listeners.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.config import Settings
from gateway.config.cache import compiled_tables_dir, facts_file
from gateway.mapping.engine import Translator
from gateway.mapping.tables import SHIPPED

if TYPE_CHECKING:
    from gateway.fhir.search import SearchRegistry


def load_translator(settings: Settings) -> Translator:
    mapping = settings.mapping
    return Translator.load(mapping.tables_dir or SHIPPED, mapping.site_dir,
                           mapping.default_offset, facts=facts_file(),
                           cache=compiled_tables_dir())


def search_registry(settings: Settings) -> SearchRegistry:
    """The search parameter table: the site's copy if it has one, else the shipped one."""
    # Imported here: a translator process loads the mapping tables only; the search index
    # (and the store interfaces it indexes for) would be imported there for nothing.
    from gateway.fhir.search import TABLE as SEARCH_TABLE
    from gateway.fhir.search import SearchRegistry

    mapping = settings.mapping
    site = mapping.site_dir / SEARCH_TABLE if mapping.site_dir is not None else None
    if site is None or not site.is_file():
        site = (mapping.tables_dir or SHIPPED) / SEARCH_TABLE
    return SearchRegistry.load(site, facts=facts_file())
