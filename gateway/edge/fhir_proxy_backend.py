"""One remote FHIR backend as the facade asks it: the call (through the read-through
cache for GET reads and searches), the answer read as FHIR JSON, normalised by the
backend's vendor table and checked against R4 as the backend's `validation` mode says,
its refusals turned into ours (its own error codes kept), its URLs moved to our base
(the backend's base or one of its aliases; a link elsewhere is dropped and counted)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import trace

from gateway.edge.errors import BackendRefused
from gateway.edge.fhir_api import Call, Pairs
from gateway.edge.fhir_errors import BackendFailed, Passthrough
from gateway.fhir import jsonio
from gateway.fhir.outcome import FHIR_JSON, FhirError
from gateway.fhir.validate import InvalidResource, validate_resource
from gateway.forward.backend import BackendUnavailable, FhirResponse
from gateway.forward.cache import ReadCache
from gateway.forward.fhir_backend import FhirBackend
from gateway.forward.metrics import FacadeMetrics
from gateway.forward.normalize import Normalizer
from gateway.policy.cursors import PageCursors
from gateway.telemetry import set_attributes

log = logging.getLogger(__name__)

Json = dict[str, Any]

# Backend answer headers a caller sees (Location is rewritten to our base).
_PASSED_HEADERS = ("ETag", "Last-Modified")
_VERSION = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# Parameters that make a search answer partial representations: not kept as reads.
_RELATIONS = frozenset({"self", "next", "previous", "prev", "first", "last"})
_PARTIAL = frozenset({"_summary", "_elements", "_contained", "_containedType"})


@dataclass(frozen=True, slots=True)
class BackendLink:
    """The backend that serves one request, with its cache and vendor table."""

    backend: FhirBackend
    cache: ReadCache | None = None
    normalizer: Normalizer | None = None
    cursors: PageCursors | None = None
    metrics: FacadeMetrics | None = None

    @property
    def name(self) -> str:
        return self.backend.name

    async def ask(self, call: Call, method: str, path: str, *,
                  query: Pairs | None = None, body: bytes | None = None,
                  headers: Mapping[str, str] | None = None, idempotent: bool | None = None,
                  cached: Sequence[str] = (), key: Pairs | None = None) -> FhirResponse:
        """One backend call; `cached`: the types a read's answer is about, to serve and
        keep it in the read-through cache (keyed by `key`, else the query)."""
        backend = self.backend
        cache = self.cache if cached else None
        sent = query or []
        key = key if key is not None else sent
        ticket: tuple[int, ...] | None = None
        span = trace.get_current_span()
        if cache is not None:
            hit = cache.get(backend.name, method, path, key)
            set_attributes(span, {"forward.backend": backend.name,
                                  "forward.cache": "miss" if hit is None else "hit"})
            if hit is not None:
                return hit
            ticket = cache.ticket(backend.name, cached)
        # Recorded: the backend call's span is a child of this request's span. Not
        # recorded: the caller's traceparent goes on as it came.
        traceparent = (None if call.api.telemetry.recording
                       else call.request.headers.get("traceparent"))
        try:
            response = await backend.request(method, path, query=sent, body=body,
                                             headers=headers, idempotent=idempotent,
                                             traceparent=traceparent)
        except BackendUnavailable as exc:  # answered 503 or 504 by fhir_errors
            raise BackendFailed(backend.name, exc) from None
        if (cache is not None
                and cache.put(backend.name, method, path, key, response, cached, ticket)
                and _is_search(path)):
            _seed_reads(cache, backend.name, response, cached, key)
        return response

    def invalidate(self, resource_type: str) -> None:
        if self.cache is not None:
            self.cache.invalidate(self.backend.name, resource_type)

    def resource(self, response: FhirResponse, expected: str | None, *,
                 refuse_invalid: bool = True) -> Json:
        """The answer's resource, normalised by the backend's vendor table and checked
        against R4 by its validation mode; 502 when it is not FHIR JSON (or not the type
        asked for), or not valid R4 where the mode refuses that. `refuse_invalid=False`
        (a write's representation: the write is done) passes an invalid one, counted."""
        try:
            document = jsonio.loads(response.body)
        except ValueError:
            raise self.bad_answer("an answer that is not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("resourceType"), str):
            raise self.bad_answer("an answer that is not a FHIR resource")
        if expected is not None and document["resourceType"] != expected:
            raise self.bad_answer(f"an answer that is not a {expected}")
        mode = self.backend.spec.validation
        normalizer = self.normalizer
        if normalizer:
            repair = mode == "repair"
            before = normalizer.repairs_made() if repair else 0
            normalizer.apply(document, in_place=True, repair=repair)
            if repair and normalizer.repairs_made() != before:
                self._count_invalid("repaired")
        self._validate(document, mode if refuse_invalid else "pass")
        return document

    def _validate(self, document: Json, mode: str) -> None:
        """`pass`: an invalid answer goes on, counted and logged (type and element only);
        `repair` (after the table's repairs) and `reject`: 502 naming the element."""
        try:
            validate_resource(document)
        except InvalidResource as exc:
            where = f"{exc.resource_type}.{exc.path}" if exc.path else exc.resource_type
            if mode == "pass":
                self._count_invalid("passed")
                log.warning("backend %s sent a %s that is not valid R4 (%s); passed on",
                            self.name, exc.resource_type, where)
                return
            self._count_invalid("rejected")
            raise BackendRefused(502, f"backend {self.name} sent a {exc.resource_type} "
                                 f"that is not valid R4: {where}: {exc.reason}", where,
                                 code="structure") from None

    def _count_invalid(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.invalid_answers.add(1, {"forward.backend": self.name,
                                                 "outcome": outcome})

    def bad_answer(self, what: str) -> FhirError:
        return BackendRefused(502, f"backend {self.backend.name} sent {what}",
                              code="exception")

    def refused(self, response: FhirResponse) -> Exception:
        """A backend's refusal as the caller gets it: its status, its OperationOutcome as
        it sent it (ours naming the status if it sent none) and its Retry-After."""
        headers = {}
        retry_after = response.headers.get("Retry-After")
        if retry_after:
            headers["Retry-After"] = retry_after
        if response.status < 400:
            return self.bad_answer(f"an unexpected HTTP {response.status}")
        if response.status in (401, 407):
            # The gateway's own credentials, not the caller's: a 401 passed on would send
            # the caller to renew a token that is fine.
            return BackendRefused(502, f"backend {self.backend.name} did not accept the "
                                  "gateway's credentials", code="exception",
                                  details=self.error_codes(response))
        if _is_outcome(response.body):
            return Passthrough(web.Response(status=response.status, body=response.body,
                                            headers=headers, content_type=FHIR_JSON))
        return BackendRefused(response.status, f"backend {self.backend.name} refused the "
                              f"request (HTTP {response.status})", headers=headers)

    def error_codes(self, response: FhirResponse) -> list[dict[str, str]]:
        """The backend's own error codes in its OperationOutcome (the systems its vendor
        table declares; codes only, never text)."""
        if self.normalizer is None or not response.body or len(response.body) > 1_000_000:
            return []
        try:
            outcome = jsonio.loads(response.body)
        except ValueError:
            return []
        return self.normalizer.error_codes(outcome)

    def relative(self, url: str) -> str | None:
        """A backend URL as a path (and query) relative to its base: on `base_url`, or on
        an alias host with the same path; a relative one is taken as the backend's. None
        for a URL elsewhere."""
        theirs = self.backend.spec.base_url.rstrip("/")
        if url == theirs or url.startswith((theirs + "/", theirs + "?")):
            return url[len(theirs):].lstrip("/")
        if "://" not in url:
            return None if url.startswith("/") else url
        aliases = self.backend.spec.aliases
        if aliases:
            base, address = urlsplit(theirs), urlsplit(url)
            if address.netloc.lower() in {a.lower() for a in aliases} and (
                    address.scheme == base.scheme):
                on_base = theirs.replace(base.netloc, address.netloc, 1)
                if url == on_base or url.startswith((on_base + "/", on_base + "?")):
                    return url[len(on_base):].lstrip("/")
        return None

    def ours(self, url: str, base: str) -> str | None:
        """A backend URL on our base (a relative one is taken as the backend's, an alias
        host's as its base's); None for a URL elsewhere."""
        relative = self.relative(url)
        if relative is None:
            return None
        return f"{base}/{relative}" if relative and not relative.startswith("?") else (
            base + relative)

    def dropped(self, relation: str) -> None:
        """A link to a host that is not the backend's: dropped, and never silently."""
        if self.metrics is not None:
            self.metrics.links_dropped.add(1, {"forward.backend": self.name})
        log.warning("backend %s: a '%s' link to a host that is neither its base_url nor "
                    "an alias was dropped", self.name,
                    relation if relation in _RELATIONS else "other")


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def passed_headers(response: FhirResponse, resource: Json | None = None) -> dict[str, str]:
    """ETag and Last-Modified as the backend sent them, else from the resource's meta."""
    headers: CIMultiDict[str] = response.headers
    passed = {name: headers[name] for name in _PASSED_HEADERS if name in headers}
    meta = resource.get("meta") if resource is not None else None
    if isinstance(meta, dict):
        version, updated = meta.get("versionId"), meta.get("lastUpdated")
        if "ETag" not in passed and isinstance(version, str) and _VERSION.fullmatch(version):
            passed["ETag"] = f'W/"{version}"'
        if "Last-Modified" not in passed and isinstance(updated, str):
            moment = _http_date(updated)
            if moment is not None:
                passed["Last-Modified"] = moment
    return passed


def _http_date(instant: str) -> str | None:
    try:
        moment = datetime.fromisoformat(instant.replace("Z", "+00:00"))
    except ValueError:
        return None
    return format_datetime(moment, usegmt=True) if moment.tzinfo is not None else None


def _is_outcome(body: bytes) -> bool:
    try:
        document = jsonio.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("resourceType") == "OperationOutcome"


def _is_search(path: str) -> bool:
    return "/" not in path or path.endswith("/_search")


def _seed_reads(cache: ReadCache, backend: str, response: FhirResponse,
                types: Sequence[str], query: Pairs) -> None:
    """A search's resources are kept as reads too (the backend's raw resource, as a read
    would answer it): the read that follows a search, such as the record of a caller just
    identified, needs no second round trip. Policy applies to these hits as to any."""
    if any(name.partition(":")[0] in _PARTIAL for name, _ in query):
        return
    try:
        bundle = jsonio.loads(response.body)
    except ValueError:
        return
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": FHIR_JSON})
    for entry in as_list(bundle.get("entry") if isinstance(bundle, dict) else None):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        type_, id_ = resource.get("resourceType"), resource.get("id")
        if (not isinstance(type_, str) or type_ not in types or not isinstance(id_, str)
                or _subsetted(resource)):
            continue
        cache.put(backend, "GET", f"{type_}/{id_}", (),
                  FhirResponse(200, headers, jsonio.dumps(resource)), (type_,))


def _subsetted(resource: Json) -> bool:
    meta = resource.get("meta")
    tags = meta.get("tag") if isinstance(meta, dict) else None
    return any(isinstance(t, dict) and t.get("code") == "SUBSETTED" for t in as_list(tags))
