"""The facade's read-through cache: a FHIR backend's recent GET answers, kept a few seconds.

What an agent reads right after a caller is identified (upcoming appointments, active
medications) is asked again moments later; the cache answers that without a second round
trip. It holds the backend's raw 200 answer, before any caller's policy: scopes,
compartment and profile are applied to every hit as to a fresh answer, so one caller's
answer can never reach another outside its scopes. A write of a type drops that type's
entries; a write that lands while a read is in flight keeps the read's (possibly older)
answer out of the cache.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gateway.forward.backend import FhirResponse

RequestKey = tuple[str, str, tuple[tuple[str, str], ...]]
CacheKey = tuple[str, RequestKey]  # (backend, ("GET", "Patient/1", (("a", "1"),)))


@dataclass(frozen=True, slots=True)
class _Entry:
    expires: float
    types: tuple[str, ...]
    response: FhirResponse


def request_key(method: str, path: str,
                query: Sequence[tuple[str, str]] = ()) -> RequestKey:
    """One request as a cache key: method, path and the query in a stable order (repeated
    parameters are ANDed, so their order carries no meaning)."""
    return method.upper(), path, tuple(sorted(query))


class ReadCache:
    """TTL and LRU bounded; `hits` and `misses` count lookups."""

    def __init__(self, ttl: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic, *,
                 max_body_bytes: int = 1024 * 1024) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_body_bytes = max_body_bytes
        self._clock = clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        # Which keys hold answers about each (backend, type), for invalidation.
        self._by_type: dict[tuple[str, str], set[CacheKey]] = {}
        # Bumped by every invalidation: a read that began before it must not be kept.
        self._generation: dict[tuple[str, str], int] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return True  # an empty cache is still a cache (`cache or None` keeps it)

    def get(self, backend: str, method: str, path: str,
            query: Sequence[tuple[str, str]] = ()) -> FhirResponse | None:
        key = (backend, request_key(method, path, query))
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires <= self._clock():
            self._remove(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.response

    def ticket(self, backend: str, types: Iterable[str]) -> tuple[int, ...]:
        """Taken before asking the backend; `put` keeps the answer only if no write to
        these types was seen in between."""
        return tuple(self._generation.get((backend, t), 0) for t in types)

    def put(self, backend: str, method: str, path: str, query: Sequence[tuple[str, str]],
            response: FhirResponse, types: Sequence[str],
            ticket: tuple[int, ...] | None = None) -> bool:
        """Keep a 200 answer about `types` (the searched type and any included ones)."""
        if (response.status != 200 or self.ttl <= 0 or self.max_entries <= 0
                or len(response.body) > self.max_body_bytes):
            return False
        if ticket is not None and ticket != self.ticket(backend, types):
            return False  # a write to one of these types happened meanwhile
        key = (backend, request_key(method, path, query))
        self._remove(key)
        self._entries[key] = _Entry(self._clock() + self.ttl, tuple(types), response)
        for type_ in types:
            self._by_type.setdefault((backend, type_), set()).add(key)
        while len(self._entries) > self.max_entries:
            self._remove(next(iter(self._entries)))
        return True

    def invalidate(self, backend: str, resource_type: str) -> int:
        """Drop every answer about this type from this backend; how many were dropped."""
        type_key = (backend, resource_type)
        self._generation[type_key] = self._generation.get(type_key, 0) + 1
        keys = self._by_type.pop(type_key, set())
        for key in keys:
            self._remove(key)
        return len(keys)

    def clear(self) -> None:
        for type_key in list(self._by_type):
            self.invalidate(*type_key)
        self._entries.clear()

    def _remove(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for type_ in entry.types:
            keys = self._by_type.get((key[0], type_))
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_type[(key[0], type_)]
