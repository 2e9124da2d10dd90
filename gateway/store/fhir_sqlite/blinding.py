"""Blind indexes for the FHIR store's search tables when the data dir is sealed.

Token codes (identifiers, telecom, codes) and strings (names, addresses) are PHI the
search tables would otherwise hold in clear. Sealed, each is stored as a blind index (a
keyed MAC, `RowCodec.blind`) and each search value is blinded the same way, so the SQL is
unchanged and matching stays exact:

- a token's code: one blind value, matched by equality (every token search is one);
- a string: a blind value of each prefix of its normalised text (up to `MAX_PREFIX`
  characters, and the whole text), so the default starts-with search still works; the
  `:exact` value is blinded once. A starts-with value longer than `MAX_PREFIX` matches
  only a whole value of that length; `:contains` is refused (SearchUnsupported, a 400).

Dates, quantities and references stay in clear: range search needs their order, and
without the sealed body they name no one (docs/encryption.md, What stays in clear).
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.store.errors import SearchUnsupported
from gateway.store.fhir import (
    IndexEntry,
    Match,
    SearchQuery,
    StringIndex,
    StringMatch,
    TokenIndex,
    TokenMatch,
)
from gateway.store.sealing import RowCodec, SealedCodec

MAX_PREFIX = 32


def blind_entries(items: Iterable[IndexEntry], codec: RowCodec) -> list[IndexEntry]:
    """A resource's index rows as a sealed data dir stores them (as they are otherwise)."""
    if not isinstance(codec, SealedCodec):
        return list(items)
    out: list[IndexEntry] = []
    for item in items:
        match item:
            case TokenIndex(param, system, code):
                out.append(TokenIndex(param, system, codec.blind(code, "token")))
            case StringIndex(param, normalized, exact):
                out.append(StringIndex(param, codec.blind(normalized, "prefix"),
                                       codec.blind(exact, "exact")))
                prefixes = codec.blind_prefixes(normalized, "prefix", MAX_PREFIX)
                if len(prefixes) == len(normalized):
                    prefixes.pop()  # the whole text: the row above
                out.extend(StringIndex(param, prefix, "") for prefix in prefixes)
            case _:
                out.append(item)
    return out


def blind_query(query: SearchQuery, codec: RowCodec) -> SearchQuery:
    """The query with its token and string values blinded as `blind_entries` stores them."""
    if not codec.sealed:
        return query
    # Built directly, not by dataclasses.replace (a few microseconds a search, each).
    return SearchQuery(query.resource_type,
                       tuple(tuple(_blind(m, codec) for m in clause) for clause in query.clauses),
                       query.sort, query.count, query.offset)


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
            return StringMatch(match.param, codec.blind(value, "prefix"), "start")
    return match
