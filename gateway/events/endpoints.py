"""Where notifications may go: absolute http(s) URLs, https unless loopback or allowed."""

from __future__ import annotations

from urllib.parse import urlsplit

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def url_problem(url: str, allow_insecure_http: bool) -> str | None:
    """Why a delivery URL is unusable, or None: absolute http(s) with a host, https unless
    it is loopback or plain http is allowed (notifications carry PHI)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an absolute http(s) URL"
    if parts.username or parts.password:
        return "must not carry credentials"
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK and not allow_insecure_http:
        return "must use https (or set events.allow_insecure_http for a test network)"
    return None
