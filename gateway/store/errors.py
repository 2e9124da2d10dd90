"""Store errors the layers above turn into answers (AR on MLLP, 503 on HTTP, 4xx on a
FHIR write): one root, `StoreError`, under every one of them."""

from __future__ import annotations

from typing import Literal


class StoreError(Exception):
    """The root of every error `gateway.store` raises."""


class StoreUnavailable(StoreError):
    """The store cannot durably take or serve data right now; the reason holds no PHI."""


class WriteConflict(StoreError):
    """A write that cannot be applied as asked; `status` is the HTTP answer, `reason` holds
    no PHI (it names the entry index and the rule, never a value)."""

    def __init__(self, status: Literal[400, 403, 404, 409, 410, 412, 422], reason: str,
                 entry: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.entry = entry


class AmbiguousMatch(WriteConflict):
    """A conditional write whose search finds more than one record (412): two records
    share the business identifier it names."""


class SearchUnsupported(StoreError):
    """A search this store cannot answer as asked (e.g. `:contains` over blind indexes);
    the reason names the parameter and modifier, never a value: a 400 at the edge."""

    def __init__(self, reason: str, parameter: str) -> None:
        super().__init__(reason)
        self.parameter = parameter


class ChainConflict(StoreUnavailable):
    """Rows another writer appended do not verify; nothing more is appended."""


class DataDirError(StoreError):
    """The data directory cannot be used as it is; one line for the operator, naming the
    directory, what is wrong and what to do (paths and modes only: no data)."""


class DataDirOpen(DataDirError):
    """The data directory or a file in it is open to other users (a start refuses it)."""


class DataDirInUse(DataDirError):
    """Another process holds the data directory's lock (another `isthmus serve`)."""
