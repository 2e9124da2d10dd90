"""The HTTP server under the app: aiohttp's, except that a request its HTTP parser refuses
(a request line or header over the limit, malformed headers) is answered as FHIR and
logged without the bytes it held.

aiohttp answers those itself, before any middleware runs, with a `400 text/plain` page
quoting the start of the refused line, and logs a traceback holding the same bytes (a
search URL is PHI). The one hook is `RequestHandler.handle_error`; the runner below makes
aiohttp's server build a protocol that overrides it. aiohttp 3.14 offers no public way to
choose the protocol class, so `_make_server` and the server's `_kwargs`/`_loop` are used
here and nowhere else (tests/security/test_bad_input.py fails if they change).
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.edge.fhir_errors import parser_refusal

log = logging.getLogger(__name__)


class _Protocol(web.RequestHandler):
    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # The type only: the exception's text quotes the refused line.
        log.info("HTTP request refused by the parser: %s", type(exc).__name__)
        answer = parser_refusal(exc, self.max_line_size)
        answer.force_close()  # what follows on the connection cannot be framed
        return answer


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose server answers parser refusals with an OperationOutcome."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _Server(made.request_handler, request_factory=made.request_factory,
                       handler_cancellation=made.handler_cancellation, **made._kwargs)
