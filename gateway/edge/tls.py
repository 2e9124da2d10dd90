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
    # Connection slots kept for this subject (mllp.tls.allowed_senders.reserved_connections).
    reserved_connections: int = 0


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


@dataclass(frozen=True, slots=True)
class Reservations:
    """Connection slots kept for named senders: a subject's reserve is the sum over its
    rules. Only the certificate is known when a connection opens (MSH-3/4 come later), so
    a slot is reserved for a subject, not for an application."""

    slots: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.slots.values())

    def key_for(self, peer: Peer) -> str | None:
        """The reserve this peer may draw on; None: only the shared slots."""
        if peer.tls_subject is None:
            return None
        key = _normalise(peer.tls_subject)
        return key if key in self.slots else None


def reservations(rules: Iterable[SenderRule]) -> Reservations | None:
    """The reserved slots the allow-list names; None when it reserves none."""
    slots: dict[str, int] = {}
    for rule in rules:
        if rule.reserved_connections:
            key = _normalise(rule.subject)
            slots[key] = slots.get(key, 0) + rule.reserved_connections
    return Reservations(slots) if slots else None


def _normalise(subject: str) -> str:
    return ",".join(part.strip() for part in subject.split(","))


def _namespace(hd: str) -> str:
    """HD.1 (namespace id) of an MSH-3/MSH-4 value; the universal id when HD.1 is empty."""
    parts = hd.split("^")
    return parts[0] or (parts[1] if len(parts) > 1 else "")


def _matches(pattern: str, value: str) -> bool:
    return pattern == "*" or pattern == value
