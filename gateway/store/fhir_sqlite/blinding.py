"""Blind indexes for the FHIR store's search tables when the data dir is sealed.

Token codes (identifiers, telecom, codes) and strings (names, addresses) are PHI the
search tables would otherwise hold in clear. Sealed, each is stored as a blind index (a
keyed MAC, `RowCodec.blind`) and each search value is blinded the same way, so the SQL is
unchanged:

- a token's code: one blind value, matched by equality (every token search is one);
- a string: a blind value of each of its first `PREFIX_ROWS` prefixes (of its normalised
  text), the last of them also carrying the blind `:exact` value. A starts-with value of
  up to `PREFIX_ROWS` characters is one equality; a longer one finds the resources whose
  value starts with its first `PREFIX_ROWS` characters, and each is checked against the
  whole value from its opened body (`BlindQuery.recheck`), so the answer is exact. Each
  prefix row is one random key in a B-tree: a row per character of every name and address
  part was ~100 rows a message, most of the apply's cost.
- `:exact` is one equality; `:contains` is refused (SearchUnsupported, a 400).

Dates, quantities and references stay in clear: range search needs their order, and
without the sealed body they name no one (docs/encryption.md, What stays in clear).

Rows written before `PREFIX_ROWS` (a row for each prefix up to 32 characters, and the whole
text) answer the same queries: a superset of rows, still exact after the recheck.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

from gateway.store.errors import SearchUnsupported
from gateway.store.fhir import (
    Clause,
    IndexEntry,
    Indexer,
    Match,
    SearchQuery,
    StoredResource,
    StringIndex,
    StringMatch,
    TokenIndex,
    TokenMatch,
)
from gateway.store.fhir_sqlite.schema import index_row
from gateway.store.sealing import RowCodec, SealedCodec

# Prefix rows a string value gets. Longer starts-with values are checked on the opened
# candidates, so this trades the apply's rows against how many candidates a long search
# value opens: those that share its first 8 characters (the same name, mostly).
PREFIX_ROWS = 8


def index_rows(resource_type: str, id_: str, items: Iterable[IndexEntry], codec: RowCodec
               ) -> dict[type[IndexEntry], list[tuple[object, ...]]]:
    """A resource's index rows as the store writes them, by kind: blinded on a sealed
    store, where a prefix row that another value of the parameter also gives is written
    once ("springfield" and "st" both start with "s")."""
    rows: dict[type[IndexEntry], list[tuple[object, ...]]] = {}
    if not isinstance(codec, SealedCodec):
        for item in items:
            rows.setdefault(type(item), []).append(index_row(resource_type, id_, item))
        return rows
    strings: list[tuple[str, list[str], str]] = []
    for item in items:
        match item:
            case TokenIndex(param, system, code):
                rows.setdefault(TokenIndex, []).append(
                    (resource_type, id_, param, system or None, codec.blind(code, "token")))
            case StringIndex(param, normalized, exact):
                prefixes = codec.blind_prefixes(normalized, "prefix", PREFIX_ROWS) or [
                    codec.blind(normalized, "prefix")]  # empty text: still its :exact row
                strings.append((param, prefixes, codec.blind(exact, "exact")))
            case _:
                rows.setdefault(type(item), []).append(index_row(resource_type, id_, item))
    if strings:
        out = rows.setdefault(StringIndex, [])
        # The last prefix row of each value carries its :exact value; a plain prefix row
        # is needed only where no other row of the parameter holds the same blind value.
        held = {(param, prefixes[-1]) for param, prefixes, _ in strings}
        for param, prefixes, exact in strings:
            out.append((resource_type, id_, param, prefixes[-1], exact))
            for prefix in prefixes[:-1]:
                if (param, prefix) not in held:
                    held.add((param, prefix))
                    out.append((resource_type, id_, param, prefix, ""))
    return rows


@dataclass(frozen=True, slots=True)
class BlindQuery:
    """A search as the SQL runs it (values blinded) and the clauses, as given, that what it
    finds must still be checked against (starts-with values longer than the prefix rows:
    the SQL finds a superset)."""

    query: SearchQuery
    rechecks: tuple[Clause, ...] = ()

    def recheck(self, found: Sequence[StoredResource], indexer: Indexer
                ) -> list[StoredResource]:
        """The resources found that hold every recheck clause, in the order found."""
        if not self.rechecks:
            return list(found)
        return [resource for resource in found if self._holds(resource, indexer)]

    def _holds(self, resource: StoredResource, indexer: Indexer) -> bool:
        strings: dict[str, list[StringIndex]] = {}
        for entry in indexer(resource.resource_type, orjson.loads(resource.body)):
            if isinstance(entry, StringIndex):
                strings.setdefault(entry.param, []).append(entry)
        return all(any(_string_holds(match, strings.get(match.param, ()))
                       for match in clause if isinstance(match, StringMatch))
                   for clause in self.rechecks)


def _string_holds(match: StringMatch, values: Iterable[StringIndex]) -> bool:
    if match.mode == "exact":
        return any(value.exact == match.value for value in values)
    return any(value.normalized.startswith(match.value) for value in values)


def blind_query(query: SearchQuery, codec: RowCodec) -> BlindQuery:
    """The query with its token and string values blinded as `blind_entries` stores them,
    and what it finds still to be checked."""
    if not codec.sealed:
        return BlindQuery(query)
    rechecks = tuple(clause for clause in query.clauses if any(
        isinstance(m, StringMatch) and m.mode == "start" and len(m.value) > PREFIX_ROWS
        for m in clause))
    # Built directly, not by dataclasses.replace (a few microseconds a search, each).
    blinded = SearchQuery(query.resource_type,
                          tuple(tuple(_blind(m, codec) for m in clause)
                                for clause in query.clauses),
                          query.sort, query.count, query.offset)
    return BlindQuery(blinded, rechecks)


def _blind(match: Match, codec: RowCodec) -> Match:
    match match:
        case TokenMatch(code=code) if code is not None:
            return TokenMatch(match.param, match.system, codec.blind(code, "token"),
                              match.negate)
        case StringMatch(value=value, mode="exact"):
            return StringMatch(match.param, codec.blind(value, "exact"), "exact")
        case StringMatch(param=param, mode="contains"):
            # A blind index has no inside to look into: a clear refusal, not a search
            # that quietly finds less.
            raise SearchUnsupported(f"{param}:contains is not available on an encrypted "
                                    "store (search by the start of the value, or :exact)",
                                    f"{param}:contains")
        case StringMatch(value=value):
            # Blind values are fixed-length hex: the store's LIKE 'value%' is equality.
            return StringMatch(match.param, codec.blind(value[:PREFIX_ROWS], "prefix"),
                               "start")
    return match
