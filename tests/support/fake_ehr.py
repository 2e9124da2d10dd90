"""A fake EHR: a FHIR R4 server and its OAuth token endpoint on 127.0.0.1, for forwarding
tests and benchmarks.

It can be slow (`delay`), fail on demand (`fail_next`, `fail_all`, with Retry-After; or
only the requests whose body carries a marker, `fail_bodies_with`: one poison patient), go
down (`stop`) and come back on the same port (`start`), demand bearer tokens
(`require_token`) issued by its own token endpoint (client secret, Basic or form, or a
SMART private_key_jwt assertion whose signature, iss/sub/aud/exp and jti it checks), and
serve TLS with an optional client-certificate requirement (give it an `ssl_context`).
It records what it was sent: `requests`, `token_requests`, `transactions`.

Resources live in memory by type and id, with a versionId per write. Search supports
identifier, _id, patient, subject, code, _count (paged with a `next` link) and any
parameter given a matcher (`search_matchers`, e.g. Cerner's `-location`).

Vendor shapes (see tests/forward/vendor_payloads/README.md): `page_style = "opaque"` pages
as Cerner does (`-pageContext=<id>&-pageDirection=NEXT`, the query kept server-side);
`link_origin` writes links on another host name of this server (an alias);
`extra_links` adds links to every searchset (say, to a foreign host); `not_found` is the
OperationOutcome a 404 answers (Epic's coded one); `operations` answers `$name` requests
by (type, name). Transactions are
recorded as they arrive and only applied when `process_transactions` is set, so that a
drain benchmark measures the gateway rather than this fake.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hmac
import ssl
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.policy.jose import KeySet, PublicKey, TokenError, read_unverified, verify_jwt

FHIR_JSON = "application/fhir+json"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
URN = "urn:uuid:"
# The diagnostics text of every injected failure: free text a gateway must never repeat.
FAILURE_DIAGNOSTICS = "fake EHR refused the request for MRN CANARY-DIAG-4471"

_ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
                409: "conflict", 410: "deleted", 412: "conflict", 422: "processing",
                429: "throttled", 500: "exception", 502: "transient", 503: "transient",
                504: "timeout"}
_REASONS = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One FHIR request as the fake received it (token requests are counted apart)."""

    method: str
    path: str  # relative to the base: "Patient/1", "Patient", "metadata", "" (the base)
    query: tuple[tuple[str, str], ...]
    headers: CIMultiDict[str]

    @property
    def traceparent(self) -> str | None:
        return self.headers.get("traceparent")

    @property
    def request_id(self) -> str | None:
        return self.headers.get("X-Request-Id")


@dataclass(frozen=True, slots=True)
class ReceivedTransaction:
    """A Bundle POSTed to the base, kept as bytes (parsed on demand)."""

    request_id: str
    traceparent: str
    body: bytes
    # When it arrived (time.monotonic), for latency measurements.
    received_at: float = field(default_factory=time.monotonic)

    @property
    def bundle(self) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self.body)
        return value


@dataclass
class _Client:
    client_id: str
    secret: str | None = None
    public_key: PublicKey | None = None
    kid: str | None = None


@dataclass
class _Version:
    resource: dict[str, Any]
    deleted: bool = False


@dataclass
class _Stored:
    versions: list[_Version] = field(default_factory=list)

    @property
    def current(self) -> _Version:
        return self.versions[-1]


# An operation's answer: (method, query, JSON body or None, instance id or None) ->
# (status, JSON document).
Operation = Callable[[str, tuple[tuple[str, str], ...], Any, "str | None"],
                     tuple[int, Any]]


class _Refusal(Exception):
    def __init__(self, status: int, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics


class FakeEhr:
    """A FHIR R4 server on 127.0.0.1 with an OAuth token endpoint; see the module doc."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None,
                 require_token: bool = False, token_lifetime: int = 3600,
                 api_key: tuple[str, str] | None = None, process_transactions: bool = False,
                 base_path: str = "/fhir/r4", host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.base_path = "/" + base_path.strip("/")
        self.ssl_context = ssl_context
        self.require_token = require_token
        self.token_lifetime = token_lifetime
        self.api_key = api_key
        self.process_transactions = process_transactions
        self.delay = 0.0        # seconds before answering each FHIR request
        self.token_delay = 0.0  # seconds before answering each token request
        self.requests: list[RecordedRequest] = []
        self.transactions: list[ReceivedTransaction] = []
        self.token_requests = 0
        self.token_methods: list[str] = []  # how each accepted token request authenticated
        self.jtis: list[str] = []           # assertion ids seen (accepted ones)
        self.unauthorized = 0                # FHIR requests answered 401
        self._clients: dict[str, _Client] = {}
        self._tokens: dict[str, float] = {}  # access token -> monotonic expiry
        self._fail_next: list[tuple[int, float | None]] = []
        self._fail_all: int | None = None
        self._fail_bodies: tuple[bytes, int] | None = None
        self._store: dict[str, dict[str, _Stored]] = {}
        self._runner: web.AppRunner | None = None
        # Vendor shapes (module doc).
        self.page_style = "offset"
        self.link_origin: str | None = None
        self.extra_links: list[dict[str, str]] = []
        self.not_found: dict[str, Any] | None = None
        self.operations: dict[tuple[str, str], Operation] = {}
        self.search_matchers: dict[str, Callable[[Mapping[str, Any], str], bool]] = {}
        self._page_contexts: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {}

    # -- addresses ------------------------------------------------------------------------

    @property
    def origin(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The FHIR base URL, e.g. http://127.0.0.1:PORT/fhir/r4."""
        return self.origin + self.base_path

    @property
    def token_url(self) -> str:
        return self.origin + "/oauth/token"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (an ephemeral port the first time, the same port after a `stop`)."""
        if self._runner is not None:
            return
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.05)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context,
                           reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0:
            self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Go down: close the listener and every connection."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> FakeEhr:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- knobs ----------------------------------------------------------------------------

    def register_client(self, client_id: str, *, secret: str | None = None,
                        public_key: PublicKey | None = None, kid: str | None = None) -> None:
        """A client the token endpoint knows: by shared secret or by public key."""
        self._clients[client_id] = _Client(client_id, secret, public_key, kid)

    def fail_next(self, n: int, status: int, retry_after: float | None = None) -> None:
        """Answer the next `n` FHIR requests with `status` and an OperationOutcome."""
        self._fail_next.extend([(status, retry_after)] * n)

    def fail_all(self, status: int | None) -> None:
        """Answer every FHIR request with `status` until called with None."""
        self._fail_all = status

    def fail_bodies_with(self, marker: bytes | None, status: int = 500) -> None:
        """Answer `status` to every FHIR request whose body contains `marker` (say, one
        patient's identifier: a poison message) and serve the rest; None: stop."""
        self._fail_bodies = None if marker is None else (marker, status)

    def revoke_tokens(self) -> None:
        """Forget every issued token (the next bearer call gets a 401)."""
        self._tokens.clear()

    def seed(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """Store a resource as if created (an id is assigned if it has none)."""
        body = dict(resource)
        return self._write(body["resourceType"], body.get("id") or _new_id(), body)[0]

    def resource(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        stored = self._store.get(resource_type, {}).get(resource_id)
        if stored is None or stored.current.deleted:
            return None
        return stored.current.resource

    def resources(self, resource_type: str) -> list[dict[str, Any]]:
        return [s.current.resource for s in self._store.get(resource_type, {}).values()
                if not s.current.deleted]

    def requests_to(self, method: str, path: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.requests
                if r.method == method and (path is None or r.path == path)]

    # -- dispatch -------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/oauth/token" and request.method == "POST":
            return await self._token(request)
        if path != self.base_path and not path.startswith(self.base_path + "/"):
            return _outcome(404, "no such endpoint")
        relative = path[len(self.base_path):].strip("/")
        query = tuple(request.query.items())
        self.requests.append(RecordedRequest(request.method, relative, query,
                                             CIMultiDict(request.headers)))
        if self.delay:
            await asyncio.sleep(self.delay)
        refused = self._refused(request)
        if refused is not None:
            return refused
        if self._fail_bodies is not None:
            marker, status = self._fail_bodies
            if marker in await request.read():
                return _outcome(status, FAILURE_DIAGNOSTICS)
        failure = self._injected_failure()
        if failure is not None:
            return failure
        try:
            return await self._route(request, relative, query)
        except _Refusal as exc:
            if exc.status == 404 and self.not_found is not None:
                return _json(404, self.not_found)
            return _outcome(exc.status, exc.diagnostics)

    def _refused(self, request: web.Request) -> web.Response | None:
        if self.api_key is not None:
            header, key = self.api_key
            if not hmac.compare_digest(request.headers.get(header, ""), key):
                self.unauthorized += 1
                return _outcome(401, "api key required")
        if not self.require_token:
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        expiry = self._tokens.get(token) if scheme.lower() == "bearer" else None
        if expiry is None or time.monotonic() >= expiry:
            self.unauthorized += 1
            return _outcome(401, "a valid bearer token is required",
                            {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return None

    def _injected_failure(self) -> web.Response | None:
        if self._fail_next:
            status, retry_after = self._fail_next.pop(0)
        elif self._fail_all is not None:
            status, retry_after = self._fail_all, None
        else:
            return None
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        return _outcome(status, FAILURE_DIAGNOSTICS, headers)

    async def _route(self, request: web.Request, relative: str,
                     query: tuple[tuple[str, str], ...]) -> web.Response:
        method = request.method
        parts = relative.split("/") if relative else []
        if not parts:
            if method == "POST":
                return await self._bundle(request)
            raise _Refusal(405, "the base takes POST of a Bundle")
        if parts == ["metadata"] and method == "GET":
            return _json(200, self._capability())
        resource_type = parts[0]
        if parts[-1].startswith("$") and len(parts) in (2, 3):
            return await self._operation(request, parts, query)
        if len(parts) == 1:
            if method == "GET":
                return _json(200, self._search(resource_type, query))
            if method == "POST":
                body = await _resource_body(request, resource_type)
                status, stored = self._create(resource_type, body,
                                              request.headers.get("If-None-Exist"))
                return _json(status, stored, _location(stored))
            if method == "PUT" and query:
                body = await _resource_body(request, resource_type)
                status, stored = self._conditional_update(resource_type, query, body, None)
                return _json(status, stored, _location(stored))
            raise _Refusal(405, "not supported on a type")
        if len(parts) == 2 and parts[1] == "_search" and method == "POST":
            form = await request.post()
            criteria = [(k, v) for k, v in form.items() if isinstance(v, str)]
            return _json(200, self._search(resource_type, (*query, *criteria)))
        if len(parts) == 2:
            resource_id = parts[1]
            if method == "GET":
                return _json(200, self._read(resource_type, resource_id))
            if method == "PUT":
                body = await _resource_body(request, resource_type)
                status, stored = self._update(resource_type, resource_id, body)
                return _json(status, stored, _location(stored))
            if method == "DELETE":
                self._delete(resource_type, resource_id)
                return web.Response(status=204)
        if len(parts) == 4 and parts[2] == "_history" and method == "GET":
            return _json(200, self._vread(resource_type, parts[1], parts[3]))
        raise _Refusal(405, "interaction not supported by the fake")

    async def _operation(self, request: web.Request, parts: list[str],
                         query: tuple[tuple[str, str], ...]) -> web.Response:
        answer = self.operations.get((parts[0], parts[-1]))
        if answer is None:
            raise _Refusal(404, "operation not supported")
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            raise _Refusal(400, "the body is not JSON") from None
        status, document = answer(request.method, query, body,
                                  parts[1] if len(parts) == 3 else None)
        return _json(status, document)

    # -- interactions ---------------------------------------------------------------------

    def _read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        stored = self._store.get(resource_type, {}).get(resource_id)
        if stored is None:
            raise _Refusal(404, "resource not found")
        if stored.current.deleted:
            raise _Refusal(410, "resource deleted")
        return stored.current.resource

    def _vread(self, resource_type: str, resource_id: str, version: str) -> dict[str, Any]:
        stored = self._store.get(resource_type, {}).get(resource_id)
        if stored is None or not version.isdigit() or not (
                1 <= int(version) <= len(stored.versions)):
            raise _Refusal(404, "version not found")
        return stored.versions[int(version) - 1].resource

    def _create(self, resource_type: str, body: dict[str, Any],
                if_none_exist: str | None) -> tuple[int, dict[str, Any]]:
        if if_none_exist:
            found = self._matches(resource_type, parse_qsl(if_none_exist.partition("?")[2]
                                                           or if_none_exist))
            if len(found) > 1:
                raise _Refusal(412, "If-None-Exist matches more than one resource")
            if found:
                return 200, found[0]
        return 201, self._write(resource_type, _new_id(), body)[0]

    def _update(self, resource_type: str, resource_id: str,
                body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if body.get("id") not in (None, resource_id):
            raise _Refusal(400, "the resource id differs from the URL's")
        stored, created = self._write(resource_type, resource_id, body)
        return (201 if created else 200), stored

    def _conditional_update(self, resource_type: str, criteria: Sequence[tuple[str, str]],
                            body: dict[str, Any],
                            new_id: str | None) -> tuple[int, dict[str, Any]]:
        found = self._matches(resource_type, criteria)
        if len(found) > 1:
            raise _Refusal(412, "the condition matches more than one resource")
        resource_id = found[0]["id"] if found else (body.get("id") or new_id or _new_id())
        return self._update(resource_type, resource_id, {**body, "id": resource_id})

    def _delete(self, resource_type: str, resource_id: str) -> None:
        stored = self._store.get(resource_type, {}).get(resource_id)
        if stored is not None and not stored.current.deleted:
            version = len(stored.versions) + 1
            stored.versions.append(_Version(
                {"resourceType": resource_type, "id": resource_id,
                 "meta": {"versionId": str(version), "lastUpdated": _now()}}, deleted=True))

    def _write(self, resource_type: str, resource_id: str,
               body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Store a version (none if nothing changed); the stored resource and whether the
        write created it."""
        by_id = self._store.setdefault(resource_type, {})
        stored = by_id.get(resource_id)
        content = {k: v for k, v in body.items() if k not in ("meta", "id")}
        if stored is not None and not stored.current.deleted:
            current = {k: v for k, v in stored.current.resource.items() if k not in ("meta", "id")}
            if current == content:
                return stored.current.resource, False
        created = stored is None or stored.current.deleted
        if stored is None:
            stored = by_id[resource_id] = _Stored()
        version = len(stored.versions) + 1
        meta = {**(body.get("meta") or {}), "versionId": str(version), "lastUpdated": _now()}
        resource = {"resourceType": resource_type, "id": resource_id, "meta": meta, **content}
        stored.versions.append(_Version(resource))
        return resource, created

    # -- search ---------------------------------------------------------------------------

    def _matches(self, resource_type: str,
                 criteria: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
        tests = [(name, value) for name, value in criteria
                 if not name.startswith("_") or name == "_id"]
        return [resource for resource in self.resources(resource_type)
                if all(self.search_matchers.get(name, partial(_matches, name=name))(
                    resource, value) for name, value in tests)]

    def _search(self, resource_type: str,
                query: Sequence[tuple[str, str]]) -> dict[str, Any]:
        context = dict(query).get("-pageContext")
        if context is not None:
            saved = self._page_contexts.get(context)
            if saved is None or saved[0] != resource_type:
                raise _Refusal(400, "unknown or expired page context")
            query = saved[1]
        params = dict(query)
        found = self._matches(resource_type, query)
        try:
            count = max(0, int(params.get("_count", "50") or 50))
            offset = max(0, int(params.get("_offset", "0") or 0))
        except ValueError:
            raise _Refusal(400, "_count and _offset are whole numbers") from None
        page = found[offset:offset + count]
        base = f"{self.link_origin or self.origin}{self.base_path}/{resource_type}"
        links = [{"relation": "self", "url": f"{base}?{urlencode(query)}"}]
        if count and offset + count < len(found):
            following = [(k, v) for k, v in query if k != "_offset"]
            following.append(("_offset", str(offset + count)))
            if self.page_style == "opaque":
                # Cerner's shape: an opaque context the server keeps (R4 Slot examples).
                token = str(uuid.uuid4())
                self._page_contexts[token] = (resource_type, tuple(following))
                following = [("-pageContext", token), ("-pageDirection", "NEXT")]
            links.append({"relation": "next", "url": f"{base}?{urlencode(following)}"})
        links.extend(self.extra_links)
        return {"resourceType": "Bundle", "type": "searchset", "total": len(found),
                "link": links,
                "entry": [{"fullUrl": f"{base}/{r['id']}", "resource": r,
                           "search": {"mode": "match"}} for r in page]}

    # -- transaction / batch --------------------------------------------------------------

    async def _bundle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.transactions.append(ReceivedTransaction(
            request.headers.get("X-Request-Id", ""), request.headers.get("traceparent", ""),
            body))
        try:
            bundle = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _Refusal(400, "the body is not JSON") from None
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or (
                bundle.get("type") not in ("transaction", "batch")):
            raise _Refusal(400, "the base takes a transaction or batch Bundle")
        entries = bundle.get("entry") or []
        kind = "transaction-response" if bundle["type"] == "transaction" else "batch-response"
        if not self.process_transactions:
            return _json(200, {"resourceType": "Bundle", "type": kind,
                               "entry": [{"response": {"status": "200 OK"}}] * len(entries)})
        return _json(200, {"resourceType": "Bundle", "type": kind,
                           "entry": self._apply(entries)})

    def _apply(self, entries: list[Any]) -> list[dict[str, Any]]:
        """Apply a transaction's entries: targets resolved first (urn:uuid references
        rewritten), then written; any refusal refuses the whole Bundle."""
        planned: list[tuple[str, str, str, dict[str, Any] | None, bool]] = []
        urns: dict[str, str] = {}
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
                raise _Refusal(400, "a Bundle entry has no request")
            method = entry["request"].get("method", "")
            path, _, condition = str(entry["request"].get("url", "")).partition("?")
            resource_type, _, resource_id = path.strip("/").partition("/")
            resource = entry.get("resource")
            full_url = str(entry.get("fullUrl", ""))
            urn_id = full_url[len(URN):] if full_url.startswith(URN) else None
            skip = False
            if method == "POST":
                if_none_exist = entry["request"].get("ifNoneExist")
                found = (self._matches(resource_type, parse_qsl(if_none_exist))
                         if if_none_exist else [])
                if len(found) > 1:
                    raise _Refusal(412, "ifNoneExist matches more than one resource")
                resource_id, skip = (found[0]["id"], True) if found else (
                    urn_id or _new_id(), False)
            elif method == "PUT" and condition:
                found = self._matches(resource_type, parse_qsl(condition))
                if len(found) > 1:
                    raise _Refusal(412, "a conditional update matches more than one resource")
                resource_id = found[0]["id"] if found else (
                    (resource or {}).get("id") or urn_id or _new_id())
            elif method not in ("PUT", "DELETE") or not resource_id:
                raise _Refusal(400, "unsupported entry request")
            if method in ("POST", "PUT") and not isinstance(resource, dict):
                raise _Refusal(400, "a write entry has no resource")
            if full_url.startswith(URN):
                urns[full_url] = f"{resource_type}/{resource_id}"
            planned.append((method, resource_type, resource_id, resource, skip))
        responses: list[dict[str, Any]] = []
        for method, resource_type, resource_id, resource, skip in planned:
            if method == "DELETE":
                self._delete(resource_type, resource_id)
                responses.append({"response": {"status": "204 No Content"}})
                continue
            assert resource is not None
            if skip:
                current = self._read(resource_type, resource_id)
                status = 200
            else:
                body = _rewrite(copy.deepcopy(resource), urns)
                body["id"] = resource_id
                current, created = self._write(resource_type, resource_id, body)
                status = 201 if created else 200
            version = current["meta"]["versionId"]
            responses.append({"response": {
                "status": _REASONS[status],
                "location": f"{resource_type}/{resource_id}/_history/{version}",
                "etag": f'W/"{version}"'}})
        return responses

    # -- OAuth token endpoint -------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type")
        try:
            method = self._client_authenticated(request, form)
        except TokenError:
            return _oauth_error(401, "invalid_client")
        self.token_methods.append(method)
        token = str(uuid.uuid4())
        self._tokens[token] = time.monotonic() + self.token_lifetime
        return web.json_response({"access_token": token, "token_type": "bearer",
                                  "expires_in": self.token_lifetime,
                                  "scope": form.get("scope", "")})

    def _client_authenticated(self, request: web.Request, form: Mapping[str, str]) -> str:
        """How the client proved itself; TokenError when it did not."""
        if "client_assertion" in form or "client_assertion_type" in form:
            self._check_assertion(form)
            return "private_key_jwt"
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                pair = base64.b64decode(credentials, validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise TokenError("bad basic credentials") from None
            client_id, _, secret = pair.partition(":")
            self._check_secret(unquote_plus(client_id), unquote_plus(secret))
            return "client_secret_basic"
        self._check_secret(form.get("client_id", ""), form.get("client_secret", ""))
        return "client_secret_post"

    def _check_secret(self, client_id: str, secret: str) -> None:
        client = self._clients.get(client_id)
        if client is None or client.secret is None or not hmac.compare_digest(
                client.secret.encode(), secret.encode()):
            raise TokenError("bad client secret")

    def _check_assertion(self, form: Mapping[str, str]) -> None:
        if form.get("client_assertion_type") != JWT_BEARER:
            raise TokenError("wrong assertion type")
        assertion = form.get("client_assertion", "")
        _, unverified = read_unverified(assertion)
        client = self._clients.get(str(unverified.get("iss", "")))
        if client is None or client.public_key is None:
            raise TokenError("unknown client")
        _, claims = verify_jwt(assertion, KeySet.of(client.public_key, client.kid),
                               allowed_algs=("RS384", "ES384"))
        now = time.time()
        exp, jti = claims.get("exp"), claims.get("jti")
        if (claims.get("iss") != client.client_id or claims.get("sub") != client.client_id
                or claims.get("aud") != self.token_url):
            raise TokenError("wrong iss, sub or aud")
        if not isinstance(exp, int) or not now < exp <= now + 305:
            raise TokenError("exp missing, past or more than five minutes ahead")
        if not isinstance(jti, str) or not jti or jti in self.jtis:
            raise TokenError("jti missing or replayed")
        self.jtis.append(jti)

    def _capability(self) -> dict[str, Any]:
        return {
            "resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
            "date": "2024-01-01", "fhirVersion": "4.0.1", "format": ["json"],
            "rest": [{"mode": "server", "security": {"extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": self.token_url}]}]}}],
        }


# -- helpers ------------------------------------------------------------------------------


def _new_id() -> str:
    return str(uuid.uuid4())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=FHIR_JSON,
                        headers=headers)


def _outcome(status: int, diagnostics: str,
             headers: Mapping[str, str] | None = None) -> web.Response:
    return _json(status, {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": _ISSUE_CODES.get(status, "processing"),
        "diagnostics": diagnostics}]}, headers)


def _oauth_error(status: int, code: str) -> web.Response:
    # RFC 6749 §5.2; the description is something a client must never repeat.
    return web.json_response({"error": code,
                              "error_description": "refused CANARY-OAUTH-9104"}, status=status)


def _location(resource: Mapping[str, Any]) -> dict[str, str]:
    version = resource["meta"]["versionId"]
    return {"Location": f"{resource['resourceType']}/{resource['id']}/_history/{version}",
            "ETag": f'W/"{version}"'}


async def _resource_body(request: web.Request, resource_type: str) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise _Refusal(400, "the body is not JSON") from None
    if not isinstance(body, dict) or body.get("resourceType") != resource_type:
        raise _Refusal(400, "the body is not a resource of the URL's type")
    return body


def _matches(resource: Mapping[str, Any], value: str, *, name: str) -> bool:
    if name == "code":
        codings = (resource.get("code") or {}).get("coding") or ()
        return any(f"{c.get('system', '')}|{c.get('code', '')}" in value.split(",")
                   or c.get("code") in value.split(",") for c in codings)
    if name == "_id":
        return resource.get("id") in value.split(",")
    if name == "identifier":
        system, bar, code = value.rpartition("|")
        return any(_identifier_fits(identifier, system if bar else None, code)
                   for identifier in resource.get("identifier") or ())
    if name in ("patient", "subject"):
        target = value if "/" in value else f"Patient/{value}"
        # An Appointment names its patient among its participants.
        actors = [p.get("actor") for p in resource.get("participant") or ()
                  if isinstance(p, dict)]
        return any(isinstance(ref, dict) and ref.get("reference") == target
                   for ref in [*(resource.get(key) for key in ("patient", "subject")),
                               *actors])
    return True  # an unknown parameter is ignored, as lenient servers do


def _identifier_fits(identifier: Any, system: str | None, value: str) -> bool:
    if not isinstance(identifier, dict):
        return False
    if system is not None and (identifier.get("system") or "") != system:
        return False
    return not value or identifier.get("value") == value


def _rewrite(value: Any, urns: Mapping[str, str]) -> Any:
    """Replace urn:uuid references with the ids the transaction gave them."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str) and item in urns:
                value[key] = urns[item]
            else:
                _rewrite(item, urns)
    elif isinstance(value, list):
        for item in value:
            _rewrite(item, urns)
    return value

