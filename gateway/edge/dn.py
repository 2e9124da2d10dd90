"""Distinguished names: a certificate's subject as an RFC 4514 string, an RFC 4514 string
parsed back, and two names compared as X.500 names (RDN sequences), never as text.

RFC 4514 §2.1 writes a name's RDNs from the last in the certificate's sequence to the
first: a subject made with `-subj "/O=Example Lab/CN=lab.example"` is
`CN=lab.example,O=Example Lab`. A `DistinguishedName` keeps the certificate's order.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from cryptography import x509

# RFC 4514 §3: the attribute types written by name; every other type is its dotted OID.
_SHORT_NAMES = {"2.5.4.3": "CN", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O",
                "2.5.4.11": "OU", "2.5.4.6": "C", "2.5.4.9": "STREET",
                "0.9.2342.19200300.100.1.25": "DC", "0.9.2342.19200300.100.1.1": "UID"}
# Names accepted when reading (case-insensitive): RFC 4514's, plus those OpenSSL and
# operators commonly write for the other subject attributes of system certificates.
_TYPES = {name.upper(): oid for oid, name in _SHORT_NAMES.items()} | {
    "EMAILADDRESS": "1.2.840.113549.1.9.1", "E": "1.2.840.113549.1.9.1",
    "SERIALNUMBER": "2.5.4.5", "TITLE": "2.5.4.12", "GN": "2.5.4.42", "SN": "2.5.4.4",
    "ORGANIZATIONIDENTIFIER": "2.5.4.97", "COMMONNAME": "2.5.4.3",
    "ORGANIZATIONNAME": "2.5.4.10", "ORGANIZATIONALUNITNAME": "2.5.4.11",
    "COUNTRYNAME": "2.5.4.6", "LOCALITYNAME": "2.5.4.7", "STATEORPROVINCENAME": "2.5.4.8"}
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
# ASN.1 universal string types (X.680 §8.4) and how their contents decode.
_STRINGS = {0x0C: "utf-8", 0x12: "ascii", 0x13: "ascii", 0x16: "ascii", 0x1A: "ascii",
            0x14: "latin-1", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}
_ESCAPED = ',+"\\<>;'


@dataclass(frozen=True, slots=True)
class Ava:
    """One attribute type and value: the type as a dotted OID; the value as text (None
    when it is not a string) and, when known, its BER encoding (RFC 4514 §2.4)."""

    oid: str
    value: str | None
    ber: bytes = b""


Rdn = tuple[Ava, ...]


@dataclass(frozen=True, slots=True)
class DistinguishedName:
    """A name's RDNs in the certificate's (ASN.1) order, first RDN first."""

    rdns: tuple[Rdn, ...]

    def rfc4514(self) -> str:
        """RFC 4514 §2: RDNs last to first, joined by ','; an RDN's values by '+'."""
        return ",".join("+".join(_ava_text(ava) for ava in rdn) for rdn in reversed(self.rdns))

    def shape(self) -> str:
        """The RFC 4514 string with every value replaced by '*': what a log line may say
        about a name it refused (its structure, not its content)."""
        return ",".join("+".join(f"{_type_text(ava)}=*" for ava in rdn)
                        for rdn in reversed(self.rdns)) or "(empty)"

    def key(self) -> tuple[frozenset[tuple[str, str]], ...]:
        """What two equal names share (X.501 §9.4, RFC 5280 §7.1): the same RDNs in the
        same order; an RDN's values as a set; values compared after RFC 4518 string
        preparation (compatibility form, case folded, insignificant spaces removed)."""
        return tuple(frozenset((ava.oid, _prepared(ava)) for ava in rdn) for rdn in self.rdns)

    def same_as(self, other: DistinguishedName) -> bool:
        return self.key() == other.key()

    def reversed(self) -> DistinguishedName:
        return DistinguishedName(tuple(reversed(self.rdns)))


def from_certificate(der: bytes) -> DistinguishedName:
    """The subject of a DER certificate, read from its encoding (tags and all)."""
    subject = x509.load_der_x509_certificate(der).subject.public_bytes()
    rdns: list[Rdn] = []
    for rdn_tag, rdn in _children(subject, 0x30):      # Name ::= SEQUENCE OF
        if rdn_tag != 0x31:                            # RelativeDistinguishedName ::= SET OF
            raise ValueError("not an RDN")
        avas: list[Ava] = []
        for ava_tag, ava in _items(rdn):
            parts = _items(ava) if ava_tag == 0x30 else []
            if len(parts) != 2 or parts[0][0] != 0x06:  # SEQUENCE {type OID, value ANY}
                raise ValueError("not an attribute type and value")
            tag, contents = parts[1]
            ber = _tlv(tag, contents)
            encoding = _STRINGS.get(tag)
            text = contents.decode(encoding) if encoding is not None else None
            avas.append(Ava(_dotted(parts[0][1]), text, ber))
        rdns.append(tuple(avas))
    return DistinguishedName(tuple(rdns))


@lru_cache(maxsize=1024)
def parse(text: str) -> DistinguishedName:
    """An RFC 4514 string as a name; ValueError naming the offset of what is wrong.

    Lenient only where that cannot change a value: spaces around ',', '+' and '=' are
    ignored (RFC 4514 §2.4 makes a value's own leading and trailing spaces '\\ ')."""
    rdns: list[Rdn] = []
    avas: list[Ava] = []
    i, n = 0, len(text)
    if not text.strip():
        return DistinguishedName(())
    while True:
        eq = text.find("=", i)
        if eq < 0:
            raise ValueError(f"offset {i}: an attribute needs type=value")
        oid = _oid_of(text[i:eq].strip(), i)
        value, ber, i = _read_value(text, eq + 1)
        avas.append(Ava(oid, value, ber))
        if i >= n or text[i] == ",":
            rdns.append(tuple(avas))
            avas = []
        if i >= n:
            break
        i += 1
    return DistinguishedName(tuple(reversed(rdns)))


def _read_value(text: str, i: int) -> tuple[str | None, bytes, int]:
    """A value from offset i to the next unescaped ',' or '+'; (text, ber, where it ends)."""
    n = len(text)
    while i < n and text[i] == " ":
        i += 1
    if i < n and text[i] == "#":  # RFC 4514 §2.4: '#' and the BER encoding in hex
        end = i + 1
        while end < n and text[end] not in ",+ ":
            end += 1
        try:
            ber = bytes.fromhex(text[i + 1:end])
        except ValueError:
            raise ValueError(f"offset {i}: '#' must be followed by hex pairs") from None
        value = _ber_text(ber)
        i = end
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] not in ",+":
            raise ValueError(f"offset {i}: ',' or '+' expected")
        return value, ber, i
    out = bytearray()
    last_significant = 0
    while i < n and text[i] not in ",+":
        ch = text[i]
        if ch == "\\":
            pair = text[i + 1:i + 3]
            if re.fullmatch(r"[0-9A-Fa-f]{2}", pair):
                out += bytes.fromhex(pair)  # RFC 4514 §3: \XX, one UTF-8 octet
                i += 3
            elif pair[:1] and pair[0] in _ESCAPED + " #=":
                out += pair[0].encode()
                i += 2
            else:
                raise ValueError(f"offset {i}: a bad escape")
            last_significant = len(out)
            continue
        if ch in '"<>;' or ch == "\x00":
            raise ValueError(f"offset {i}: {ch!r} must be escaped")
        out += ch.encode()
        if ch != " ":
            last_significant = len(out)
        i += 1
    try:
        value = bytes(out[:last_significant]).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"offset {i}: the escaped octets are not UTF-8") from None
    return value, b"", i


def _oid_of(name: str, where: int) -> str:
    if _OID.fullmatch(name):
        return name
    if _KEYWORD.fullmatch(name) and name.upper() in _TYPES:
        return _TYPES[name.upper()]
    raise ValueError(f"offset {where}: unknown attribute type {name[:32]!r}")


def _ber_text(ber: bytes) -> str | None:
    """The text of a BER-encoded string value; None for anything else."""
    try:
        parts = _children(_tlv(0x30, ber), 0x30)
        if len(parts) == 1 and parts[0][0] in _STRINGS:
            return parts[0][1].decode(_STRINGS[parts[0][0]])
    except (ValueError, UnicodeDecodeError):
        pass
    return None


def _type_text(ava: Ava) -> str:
    return _SHORT_NAMES.get(ava.oid, ava.oid)


def _ava_text(ava: Ava) -> str:
    # RFC 4514 §2.4: a type without a short name, or a value that is not a string, is
    # written as '#' and the hex of its BER encoding.
    if ava.ber and (ava.value is None or ava.oid not in _SHORT_NAMES):
        return f"{_type_text(ava)}=#{ava.ber.hex()}"
    return f"{_type_text(ava)}={escape(ava.value or '')}"


def escape(value: str) -> str:
    """RFC 4514 §2.4: escape ',+"\\<>;' and NUL anywhere, '#' or ' ' first, ' ' last."""
    out = "".join("\\" + ch if ch in _ESCAPED else "\\00" if ch == "\x00" else ch
                  for ch in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def _prepared(ava: Ava) -> str:
    if ava.value is None:
        return "#" + ava.ber.hex()  # not a string: compared octet by octet
    # RFC 4518 §2 in short: NFKC, case folded (caseIgnoreMatch), spaces collapsed.
    return " ".join(unicodedata.normalize("NFKC", ava.value).casefold().split())


# -- DER, just enough for a Name --------------------------------------------------------


def _children(data: bytes, outer: int | None) -> list[tuple[int, bytes]]:
    """The (tag, contents) items inside one TLV whose tag is `outer` (any when None)."""
    tag, contents, rest = _read(data)
    if rest or (outer is not None and tag != outer):
        raise ValueError("unexpected DER")
    return _items(contents)


def _items(contents: bytes) -> list[tuple[int, bytes]]:
    """The (tag, contents) of each TLV in a constructed value's contents."""
    items = []
    while contents:
        item_tag, item, contents = _read(contents)
        items.append((item_tag, item))
    return items


def _read(data: bytes) -> tuple[int, bytes, bytes]:
    if len(data) < 2:
        raise ValueError("truncated DER")
    tag, length, offset = data[0], data[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[2:2 + count], "big")
        offset += count
    if len(data) < offset + length:
        raise ValueError("truncated DER")
    return tag, data[offset:offset + length], data[offset + length:]


def _tlv(tag: int, contents: bytes) -> bytes:
    n = len(contents)
    if n < 0x80:
        return bytes([tag, n]) + contents
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + contents


def _dotted(encoded: bytes) -> str:
    """X.690 §8.19: the first octets hold 40*X+Y, then base-128 arcs."""
    arcs: list[int] = []
    value = 0
    for octet in encoded:
        value = (value << 7) | (octet & 0x7F)
        if not octet & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0] if arcs else 0
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(arc) for arc in head + arcs[1:])
