"""TLS for MLLP: the server context (TLS >= 1.2, optional mTLS) and the sender allow-list."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.edge.dn import DistinguishedName, parse
from gateway.hl7.message import Header
from gateway.ingest.protocol import Peer, SenderCheck

log = logging.getLogger(__name__)

# A name as compared: its RDNs, each a set of (type, prepared value) (gateway.edge.dn).
NameKey = tuple[frozenset[tuple[str, str]], ...]


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
    """A certificate subject (an RFC 4514 string) and the MSH-3 / MSH-4 namespace ids it
    may send as ('*': any)."""

    subject: str
    sending_application: str
    sending_facility: str = "*"
    # Connection slots kept for this subject (mllp.tls.allowed_senders.reserved_connections).
    reserved_connections: int = 0


def sender_check(rules: Iterable[SenderRule]) -> SenderCheck:
    """A check that passes only when the peer's subject has a rule matching MSH-3/MSH-4.

    Subjects are compared as names (RDN sequences of type and value, RFC 5280 §7.1), not
    as strings; ValueError (naming the rule) for a subject that is not RFC 4514."""
    entries: list[tuple[int, DistinguishedName, SenderRule]] = []
    for index, rule in enumerate(rules):
        try:
            entries.append((index, parse(rule.subject), rule))
        except ValueError as exc:
            raise ValueError(f"allowed_senders[{index}].subject: {exc}") from None
    by_name: dict[object, list[SenderRule]] = {}
    for _, name, rule in entries:
        by_name.setdefault(name.key(), []).append(rule)

    def allowed(peer: Peer, header: Header) -> bool:
        if peer.tls_subject is None:
            log.warning("MLLP sender refused: no verified client certificate")
            return False
        try:
            name = parse(peer.tls_subject)
        except ValueError:  # our own rendering, so not expected; refused all the same
            log.warning("MLLP sender refused: certificate subject unreadable")
            return False
        app = _namespace(header.sending_application)
        facility = _namespace(header.sending_facility)
        listed = by_name.get(name.key(), ())
        if any(_matches(rule.sending_application, app)
               and _matches(rule.sending_facility, facility) for rule in listed):
            return True
        _log_refusal(name, bool(listed), entries)
        return False

    return allowed


def _log_refusal(name: DistinguishedName, listed: bool,
                 entries: Sequence[tuple[int, DistinguishedName, SenderRule]]) -> None:
    """One short line: the refused subject's shape (types, no values) and the allow-list
    entry it came closest to; never the certificate's values."""
    if listed:
        log.warning("MLLP sender refused: certificate subject %s is allowed, but not as "
                    "this MSH-3/MSH-4", name.shape())
        return
    if not entries:
        log.warning("MLLP sender refused: certificate subject shape %s; the allow-list is "
                    "empty", name.shape())
        return
    index, nearest, hint = _nearest(name, entries)
    log.warning("MLLP sender refused: certificate subject shape %s matches no allow-list "
                "entry; nearest allowed_senders[%d] %r%s", name.shape(), index,
                nearest.subject[:120], hint)


def _nearest(name: DistinguishedName, entries: Sequence[tuple[int, DistinguishedName,
                                                               SenderRule]]
             ) -> tuple[int, SenderRule, str]:
    """The entry to name in a refusal: the same name in reverse RDN order (an allow-list
    written for the pre-RFC 4514 rendering), else one of the same shape, else the first."""
    reversed_key = name.reversed().key()
    for index, entry, rule in entries:
        if entry.key() == reversed_key:
            return index, rule, " (the same RDNs in reverse order: RFC 4514 writes the " \
                                "last RDN first)"
    for index, entry, rule in entries:
        if entry.shape() == name.shape():
            return index, rule, " (same shape, other values)"
    index, _, rule = entries[0]
    return index, rule, ""


@dataclass(frozen=True, slots=True)
class Reservations:
    """Connection slots kept for named senders: a subject's reserve is the sum over its
    rules. Only the certificate is known when a connection opens (MSH-3/4 come later), so
    a slot is reserved for a subject, not for an application."""

    slots: dict[NameKey, int]

    @property
    def total(self) -> int:
        return sum(self.slots.values())

    def key_for(self, peer: Peer) -> NameKey | None:
        """The reserve this peer may draw on; None: only the shared slots. Subjects are
        compared as names, as the allow-list compares them."""
        if peer.tls_subject is None:
            return None
        try:
            key = parse(peer.tls_subject).key()
        except ValueError:  # our own rendering, so not expected: the shared slots only
            return None
        return key if key in self.slots else None


def reservations(rules: Iterable[SenderRule]) -> Reservations | None:
    """The reserved slots the allow-list names; None when it reserves none."""
    slots: dict[NameKey, int] = {}
    for index, rule in enumerate(rules):
        if rule.reserved_connections:
            try:
                key = parse(rule.subject).key()
            except ValueError as exc:
                raise ValueError(f"allowed_senders[{index}].subject: {exc}") from None
            slots[key] = slots.get(key, 0) + rule.reserved_connections
    return Reservations(slots) if slots else None


def _namespace(hd: str) -> str:
    """HD.1 (namespace id) of an MSH-3/MSH-4 value; the universal id when HD.1 is empty."""
    parts = hd.split("^")
    return parts[0] or (parts[1] if len(parts) > 1 else "")


def _matches(pattern: str, value: str) -> bool:
    return pattern == "*" or pattern == value
