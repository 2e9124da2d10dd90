"""A remote FHIR server's configuration and connection set-up: the spec the composition
fills from config, the transport rules it must meet (https, or http only where allowed),
the client TLS context, and the one HTTP session a backend keeps for its lifetime.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from gateway.forward.outbound_auth import AuthSpec


@dataclass(frozen=True)
class FhirBackendSpec:
    """One remote FHIR server: where, how to authenticate, and how gently to call it."""

    name: str
    base_url: str
    auth: AuthSpec = AuthSpec()
    rate_limit: str = ""  # "5000/hour"; "" is unlimited
    verify_tls: bool = True
    allow_insecure_http: bool = False
    ca_file: Path | None = None
    client_cert_file: Path | None = None  # mTLS
    client_key_file: Path | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_concurrency: int = 8
    max_retries: int = 2
    backoff_base: float = 0.2
    backoff_max: float = 30.0
    max_retry_after: float = 5.0
    breaker_failures: int = 5
    breaker_reset: float = 30.0
    aliases: tuple[str, ...] = ()  # other "host[:port]" names of the same server
    validation: str = "pass"  # repair | pass | reject: an answer that is not valid R4


def client_ssl_context(spec: FhirBackendSpec) -> ssl.SSLContext | None:
    """The TLS context for an https backend (None for http): TLS >= 1.2, the server
    verified against the system store or `ca_file`, and the client certificate for mTLS."""
    if not spec.base_url.startswith("https://"):
        return None
    return _tls_context(spec)


def _tls_context(spec: FhirBackendSpec) -> ssl.SSLContext:
    return client_tls_context(spec.ca_file, spec.verify_tls, spec.client_cert_file,
                              spec.client_key_file)


def client_tls_context(ca_file: Path | None, verify: bool = True,
                       client_cert_file: Path | None = None,
                       client_key_file: Path | None = None) -> ssl.SSLContext:
    """A client TLS context for any backend (FHIR or MLLP): TLS >= 1.2, the server verified
    against the system store or `ca_file` unless `verify` is off, a certificate for mTLS."""
    context = ssl.create_default_context(
        cafile=str(ca_file) if ca_file is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert_file is not None:
        context.load_cert_chain(client_cert_file, client_key_file)
    return context


def _check_transport(spec: FhirBackendSpec) -> None:
    address = urlsplit(spec.base_url)
    if address.scheme not in ("http", "https") or not address.hostname:
        raise ValueError(f"backend '{spec.name}': base_url must be an http(s) URL")
    host = address.hostname
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if address.scheme == "http" and not (spec.allow_insecure_http or loopback):
        raise ValueError(f"backend '{spec.name}': plain http:// needs allow_insecure_http")
    if not spec.verify_tls and not spec.allow_insecure_http:
        raise ValueError(f"backend '{spec.name}': verify_tls = false needs "
                         "allow_insecure_http")


def open_session(spec: FhirBackendSpec) -> aiohttp.ClientSession:
    """The backend's one HTTP session, once its transport is checked (ValueError if not
    allowed): TLS as the spec says (the token endpoint's too), timeouts, and room for a
    token request."""
    _check_transport(spec)
    context = client_ssl_context(spec)
    if context is None and spec.auth.token_url.startswith("https://"):
        context = _tls_context(spec)
    # One more connection than the bulkhead: a token request made while every slot
    # is busy still finds one.
    connector = aiohttp.TCPConnector(limit=spec.max_concurrency + 1,
                                     ssl=context if context is not None else True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=spec.connect_timeout,
                                    sock_read=spec.read_timeout)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                 headers={"User-Agent": "isthmus"})
