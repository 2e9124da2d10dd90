"""The FHIR resource store's interface: what the layers above may ask, in plain data.

Nothing here knows SQLite. The embedded implementation is `fhir_sqlite.SqliteFhirStore`;
a PostgreSQL one (several gateways behind one load balancer) satisfies the same
`FhirStore` protocol. Search is expressed as `SearchQuery` data built by the FHIR codec
(`gateway.fhir.search`) and index rows come from an `Indexer` the composition passes in,
so the store never needs to know FHIR search parameter definitions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# WriteConflict is defined in errors.py; imported here too for the old import path.
from gateway.store.errors import WriteConflict as WriteConflict

# -- index rows, computed from a resource by the Indexer on every write ---------------------


@dataclass(frozen=True, slots=True)
class TokenIndex:
    """identifier, code, status, gender, telecom (phone/email): system|code pairs."""

    param: str
    system: str | None  # None: the element carries no system
    code: str


@dataclass(frozen=True, slots=True)
class StringIndex:
    """name, family, given, address-postalcode: `normalized` is lower-case, accents
    removed (default and :contains matching); `exact` is the value as stored (:exact)."""

    param: str
    normalized: str
    exact: str


@dataclass(frozen=True, slots=True)
class DateIndex:
    """birthdate, date, _lastUpdated: the instant range [low, high] the value covers, as
    fixed-width UTC text 'YYYY-MM-DDTHH:MM:SS.ffffffZ' (text order is time order)."""

    param: str
    low: str
    high: str


@dataclass(frozen=True, slots=True)
class ReferenceIndex:
    """patient, subject, performer...: the target as 'Type/id' (local references only)."""

    param: str
    target: str


@dataclass(frozen=True, slots=True)
class QuantityIndex:
    """value-quantity: the number with its unit system and code."""

    param: str
    value: float
    system: str | None
    code: str | None


IndexEntry = TokenIndex | StringIndex | DateIndex | ReferenceIndex | QuantityIndex

# Called with (resource_type, resource as a dict, including id and meta) on every write.
Indexer = Callable[[str, dict[str, Any]], Sequence[IndexEntry]]

# resource type -> its groups of string parameters (two or more each) that read within one
# element (`name` and `family`, which is `name.family`): a sealed SQLite store writes a
# value such parameters share once (gateway.store.fhir_sqlite.blinding, `index_rows`).
StringGroups = Mapping[str, Sequence[frozenset[str]]]

# -- search ---------------------------------------------------------------------------------

Prefix = Literal["eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap"]


@dataclass(frozen=True, slots=True)
class TokenMatch:
    """system None: any system; system "": no system (`|code`); code None: any code of the
    system (`system|`)."""

    param: str
    system: str | None
    code: str | None
    negate: bool = False  # :not


@dataclass(frozen=True, slots=True)
class StringMatch:
    param: str
    value: str  # already normalised for "start"/"contains"; as given for "exact"
    mode: Literal["start", "exact", "contains"] = "start"
    # ":exact": the `normalized` values the rows holding `value` carry (the value normalised;
    # blinded on a sealed store), so the lookup index finds them instead of the store
    # reading every row of the parameter. Empty: `exact` alone decides.
    keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DateMatch:
    """The search value's own range [low, high] and the prefix comparing it to the index
    range, as FHIR R4 §3.1.1.4.2.2 defines (eq: index range within the value's range)."""

    param: str
    prefix: Prefix
    low: str
    high: str


@dataclass(frozen=True, slots=True)
class ReferenceMatch:
    param: str
    target: str  # 'Type/id'


@dataclass(frozen=True, slots=True)
class QuantityMatch:
    param: str
    prefix: Prefix
    value: float
    system: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class MissingMatch:
    """:missing=true (no index row for the param) or :missing=false (at least one)."""

    param: str
    missing: bool


@dataclass(frozen=True, slots=True)
class IdMatch:
    """_id: the resource's logical id."""

    id: str


@dataclass(frozen=True, slots=True)
class LastUpdatedMatch:
    prefix: Prefix
    low: str
    high: str


Match = (TokenMatch | StringMatch | DateMatch | ReferenceMatch | QuantityMatch | MissingMatch
         | IdMatch | LastUpdatedMatch)
# One search parameter occurrence: its comma-separated values, OR-ed.
Clause = tuple[Match, ...]


@dataclass(frozen=True, slots=True)
class SortKey:
    """`param` is an indexed parameter name, or '_id' or '_lastUpdated'."""

    param: str
    descending: bool = False


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """Clauses AND-ed; each clause's matches OR-ed. Results in `sort` order, then by
    last-updated and id so that paging is stable. `count` None: no limit."""

    resource_type: str
    clauses: tuple[Clause, ...] = ()
    sort: tuple[SortKey, ...] = ()
    count: int | None = None
    offset: int = 0


@dataclass(frozen=True, slots=True)
class StoredResource:
    """One version of a resource as stored: `body` is the exact JSON served on read, with
    id, meta.versionId and meta.lastUpdated already in it. A deletion is a version with
    `deleted` True and an empty body."""

    resource_type: str
    id: str
    version: int
    last_updated: str  # FHIR instant, UTC, e.g. '2026-11-26T15:28:09.123456Z'
    deleted: bool
    body: bytes


@dataclass(frozen=True, slots=True)
class SearchPage:
    resources: list[StoredResource]
    total: int | None  # set when the query asked for it


# -- writes ---------------------------------------------------------------------------------


# A caller's judgement of what a PUT or DELETE replaces, made by the store inside the
# transaction once the write is resolved (so no other write can slip in between): the
# current version (None, or a deletion marker, when there is none: the PUT creates) ->
# None to go ahead, or the (HTTP status, reason) the write is refused with.
Refusal = tuple[Literal[403, 404], str]
ReplaceCheck = Callable[["StoredResource | None"], "Refusal | None"]


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """One entry of a transaction or batch, or a single REST write.

    POST: create; `id` is assigned by the store unless given; `condition` is If-None-Exist.
    PUT: update (or create at that id); `condition` makes it a conditional update (no
    `id` then); `if_match` a version for optimistic locking (412 on mismatch).
    DELETE: by `id`, or conditional by `condition`.
    `full_url`: the entry's fullUrl ('urn:uuid:...'), so references to it in other entries
    of the same transaction are rewritten to the final 'Type/id'.
    `check`: judges what a PUT or DELETE replaces (see ReplaceCheck); a refusal is a
    WriteConflict with its status. `carry`: what an update keeps of the version it
    replaces (see Carry). `create_id`: the id a conditional update that finds nothing
    creates at (a translated message's deterministic id); one that finds a record updates
    it, whatever its id (a merged-away identifier now held by the survivor).
    """

    method: Literal["POST", "PUT", "DELETE"]
    resource_type: str
    id: str | None = None
    resource: dict[str, Any] | None = None
    condition: SearchQuery | None = None
    if_match: int | None = None
    full_url: str | None = None
    check: ReplaceCheck | None = field(default=None, compare=False, repr=False)
    carry: Carry | None = field(default=None, compare=False, repr=False)
    create_id: str | None = None


# Told the current version's content (a dict) and the update's resource, before an update
# replaces it: copies into the update what it must not lose (a merge's links).
Carry = Callable[[dict[str, Any], dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Merge:
    """The records `source` finds merged into `target`, after the call's writes (FHIR R4
    Patient.link; R5 $merge): each is kept with `active` false and a `replaced-by` link to
    the survivor, which gets a `replaces` link back; every reference to it in the store
    (Provenance aside: history stays as it was) moves to the survivor; its identifiers
    move to the survivor as `use: old`, except those in `retired` ((system, value) pairs:
    an identifier that was wrong, A47), which are dropped. A type without `link` (an
    Account, ADT^A41: `kept` is "status") is kept with `status` inactive instead, and
    the survivor gets no `replaces` link."""

    resource_type: str
    source: SearchQuery
    target: str  # the survivor: the fullUrl of an entry of the same call, or its id
    retired: tuple[tuple[str, str], ...] = ()
    kept: str = "link"  # how a merged-away record is marked: "link" or "status"


@dataclass(frozen=True, slots=True)
class MergeOutcome:
    """What a merge did: the records merged away, and how many resources' references moved."""

    target: str  # 'Type/id'
    merged: tuple[str, ...]  # 'Type/id' of each record merged away
    moved: int


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """status: 201 created, 200 updated (or matched by If-None-Exist / unchanged content),
    204 deleted (or nothing to delete). `stored` is the resulting version (None after a
    delete). `changed` False when nothing was written (a matched If-None-Exist, or an update
    whose content equals the current version's, so a resent message adds no version)."""

    status: int
    stored: StoredResource | None
    changed: bool = True


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """Instance history (type and id), type history (type), or system history (neither)."""

    resource_type: str | None = None
    id: str | None = None
    since: str | None = None  # instant; versions last updated at or after it
    count: int = 50
    offset: int = 0


@dataclass
class StoreStats:
    resources: int = 0
    versions: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


# Awaited between applying a transact() call's writes and committing them.
BeforeCommit = Callable[[list[WriteOutcome | WriteConflict]], Awaitable[None]]


class FhirStore(Protocol):
    """Versioned FHIR resources with search indexes; every method is safe to call
    concurrently. Writes in one `transact` call are atomic when `atomic` is True (a
    transaction Bundle) and independent otherwise (a batch Bundle)."""

    # True when `transact` calls made at once are applied one after another in the order
    # they were made (the embedded store's one writer); False when each is a transaction
    # of its own, run at once and committed in any order (PostgreSQL). A caller whose
    # calls must land in order (one patient's messages) waits for each on such a store.
    applies_in_call_order: bool

    async def read(self, resource_type: str, id: str) -> StoredResource | None:
        """The current version (possibly a deletion marker), or None if never stored."""

    async def vread(self, resource_type: str, id: str, version: int) -> StoredResource | None:
        ...

    async def search(self, query: SearchQuery, *, total: bool = False) -> SearchPage:
        """Current, non-deleted versions matching the query."""

    async def count(self, query: SearchQuery) -> int:
        ...

    async def history(self, query: HistoryQuery) -> SearchPage:
        """Versions newest first; total always set."""

    async def transact(self, writes: Sequence[WriteRequest], *, atomic: bool = True,
                       before_commit: BeforeCommit | None = None,
                       merges: Sequence[Merge] = ()
                       ) -> list[WriteOutcome | WriteConflict]:
        """Apply writes. atomic: all or nothing, raising the first WriteConflict (with its
        entry index). Not atomic: each entry on its own; a failed entry's slot holds its
        WriteConflict. `merges` run after an atomic call's writes, in the same transaction.
        Conditional writes are resolved and written one call at a time, so two calls
        conditional on one identifier never both create.

        `before_commit` is awaited with the outcomes once the writes are applied and before
        they are committed (and so before anyone can read them); if it raises, the writes
        are rolled back and its exception is raised here: nothing was written. The edge
        makes the audit record durable there (every PHI access is on record first)."""

    async def probe_writable(self) -> None:
        """Raise StoreUnavailable if a write could not be committed now."""

    async def close(self) -> None:
        ...
