"""The search registry: every searchable type's parameters, and the one object the store
(indexing on every write) and the edge (parsing every search) hold."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway.fhir.errors import SearchError
from gateway.fhir.model import top_level_elements
from gateway.fhir.model_cache import FACTS
from gateway.fhir.search.index import judge, reference_target, values
from gateway.fhir.search.params import SearchParameter, read_table, string_groups
from gateway.fhir.search.query import ParsedSearch, parse_query
from gateway.store.fhir import Clause, IndexEntry, ReferenceIndex, StringGroups

# `about`'s stand-in for a reference it cannot resolve to one patient (never a real id:
# FHIR R4 ids are [A-Za-z0-9-.]).
UNRESOLVED = "Patient/?"


class SearchRegistry:
    """The search parameters of every resource type the store serves."""

    def __init__(self, parameters: Iterable[SearchParameter]) -> None:
        by_type: dict[str, dict[str, SearchParameter]] = {}
        for p in parameters:
            by_type.setdefault(p.resource, {})[p.name] = p
        self._by_type = {t: MappingProxyType(ps) for t, ps in by_type.items()}
        self._elements = {t: top_level_elements(t) for t in by_type}
        self._compartment = {t: tuple(n for n, p in ps.items() if p.compartment)
                             for t, ps in by_type.items()}
        self._subject = {t: tuple(p for p in ps.values() if p.subject)
                         for t, ps in by_type.items()}
        self._string_groups = {t: groups for t, ps in by_type.items()
                               if (groups := string_groups(ps.values()))}
        # Every path of every parameter, in table order, with the top-level element it
        # starts at: a resource holds few of its type's elements, and a path whose first
        # is absent reaches nothing (Patient: 5 of its ~40 paths indexed a new patient).
        self._index_paths = {t: tuple((name, path.steps[0].name, path)
                                      for name, p in ps.items() for path in p.paths)
                             for t, ps in by_type.items()}

    @classmethod
    def load(cls, path: Path, *, facts: Path | None = None) -> SearchRegistry:
        """Read and check the table; SearchTableError names the file and line of a bad row.

        `facts`: the file where the FHIR model's answers are kept between runs
        (`gateway.fhir.model_cache`), as for the mapping tables: the checks read the
        model's types and elements, and with the answers kept a start imports no FHIR
        model for them (~0.3 s of CPU at an apply worker's start)."""
        with FACTS.kept_in(facts):
            return cls(read_table(path))

    def types(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_type))

    def params(self, resource_type: str) -> Mapping[str, SearchParameter]:
        """name -> definition (empty for a type the table does not list)."""
        return self._by_type.get(resource_type, MappingProxyType({}))

    def string_groups(self) -> StringGroups:
        """Each type's groups of string parameters reading within one element (`name`,
        `family`, `given`), for a sealed store's shared index rows."""
        return MappingProxyType(self._string_groups)

    def compartment_params(self, resource_type: str) -> tuple[str, ...]:
        """Reference parameters placing a resource in the Patient compartment (Patient
        itself: none; use _id)."""
        return self._compartment.get(resource_type, ())

    def element_roots(self, resource_type: str, param: str) -> frozenset[str]:
        """The top-level elements a parameter reads; KeyError for an unknown parameter."""
        if param == "_id":
            return frozenset({"id"})
        if param == "_lastUpdated":
            return frozenset({"meta"})
        return self._by_type[resource_type][param].roots

    # -- indexing (every write) -------------------------------------------------------------

    def index(self, resource_type: str, resource: dict[str, Any],
              only: Collection[str] | None = None) -> list[IndexEntry]:
        """The index rows of a resource (of the `only` parameters, if given); what cannot
        be indexed is skipped, never raised."""
        paths = self._index_paths.get(resource_type)
        if paths is None or not isinstance(resource, dict):
            return []
        out: list[IndexEntry] = []
        for name, root, path in paths:
            if root not in resource or (only is not None and name not in only):
                continue
            for value in values(resource, path.steps):
                path.emit(name, value, out)
        return list(dict.fromkeys(out))

    def patients(self, resource_type: str, resource: dict[str, Any]) -> set[str]:
        """The patients ('Patient/id') whose compartment holds this resource: only the
        compartment parameters are read (every read of a confined token asks this)."""
        if resource_type == "Patient":
            return {f"Patient/{resource.get('id')}"} if isinstance(resource, dict) else set()
        params = self._by_type.get(resource_type)
        if params is None or not isinstance(resource, dict):
            return set()
        out: list[IndexEntry] = []
        for name in self._compartment.get(resource_type, ()):
            for path in params[name].paths:
                for value in values(resource, path.steps):
                    path.emit(name, value, out)
        return {entry.target for entry in out if isinstance(entry, ReferenceIndex)
                and entry.target.startswith("Patient/")}

    def about(self, resource_type: str, resource: dict[str, Any]) -> set[str]:
        """The patients ('Patient/id') this resource is about: what its compartment
        subject parameters name (Observation.subject, Condition.subject, ...; never a
        performer, asserter or author). A reference there that names no resource by its
        URL (identifier only, '#contained', 'urn:uuid:') or names a Group stands as
        UNRESOLVED: it could be any patient. A Patient is about itself."""
        if not isinstance(resource, dict):
            return set()
        if resource_type == "Patient":
            return {f"Patient/{resource.get('id')}"}
        found: set[str] = set()
        for param in self._subject.get(resource_type, ()):
            for path in param.paths:
                for value in values(resource, path.steps):
                    text = value.get("reference") if isinstance(value, dict) else None
                    target = reference_target(text) if isinstance(text, str) else None
                    kind = target.partition("/")[0] if target is not None else None
                    if kind == "Patient":
                        found.add(str(target))
                    elif kind is None or kind == "Group":
                        found.add(UNRESOLVED)
        return found

    def matches(self, resource_type: str, resource: dict[str, Any],
                clauses: Sequence[Clause]) -> bool | None:
        """Whether a resource (not yet stored) meets these clauses, judged on its index rows
        as the store would; None when a clause uses a match this cannot judge in memory
        (dates, quantities, _lastUpdated), so the caller refuses rather than guesses."""
        entries = self.index(resource_type, resource)
        for clause in clauses:
            verdicts = [judge(match, resource, entries) for match in clause]
            if None in verdicts:
                return None
            if not any(verdicts):
                return False
        return True

    # -- parsing (every search) -------------------------------------------------------------

    def parse(self, resource_type: str, params: Sequence[tuple[str, str]], *,
              default_count: int, max_count: int, lenient: bool = False) -> ParsedSearch:
        """The query parameters as a store query and result options; SearchError (400) or
        UnsupportedFormat (415). lenient ignores unknown parameters, not malformed values."""
        defs = self._by_type.get(resource_type)
        if defs is None:
            raise SearchError("_type", "this resource type is not searchable here")
        return parse_query(resource_type, defs, params, params_of=self.params,
                           elements=self._elements[resource_type],
                           default_count=default_count, max_count=max_count, lenient=lenient)
