"""TLS for MLLP: the server context (TLS >= 1.2, optional mTLS) and the sender allow-list."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.hl7.message import Header
from gateway.ingest.protocol import Peer, SenderCheck


def server_context(cert_file: Path, key_file: Path, client_ca_file: Path | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


@dataclass(frozen=True, slots=True)
class SenderRule:
    """A certificate subject and the MSH-3 / MSH-4 namespace ids it may send as ('*': any)."""

    subject: str
    sending_application: str
    sending_facility: str = "*"


def sender_check(rules: Iterable[SenderRule]) -> SenderCheck:
    """A check that passes only when the peer's subject has a rule matching MSH-3/MSH-4."""
    by_subject: dict[str, list[SenderRule]] = {}
    for rule in rules:
        by_subject.setdefault(_normalise(rule.subject), []).append(rule)

    def allowed(peer: Peer, header: Header) -> bool:
        if peer.tls_subject is None:
            return False
        app = _namespace(header.sending_application)
        facility = _namespace(header.sending_facility)
        return any(
            _matches(rule.sending_application, app) and _matches(rule.sending_facility, facility)
            for rule in by_subject.get(_normalise(peer.tls_subject), ())
        )

    return allowed


def _normalise(subject: str) -> str:
    return ",".join(part.strip() for part in subject.split(","))


def _namespace(hd: str) -> str:
    """HD.1 (namespace id) of an MSH-3/MSH-4 value; the universal id when HD.1 is empty."""
    parts = hd.split("^")
    return parts[0] or (parts[1] if len(parts) > 1 else "")


def _matches(pattern: str, value: str) -> bool:
    return pattern == "*" or pattern == value
