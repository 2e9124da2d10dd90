"""MLLP over TLS: TLS >= 1.2 only, optional mTLS, and the certificate -> MSH-3/MSH-4 allow-list.

Real TLS sockets on 127.0.0.1. A throwaway CA, a server certificate and two client
certificates are made once per session with `cryptography`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import MllpPeer, message, segments, with_control_id
from support.pki import (
    Pki,
    client_context,
    intruder,
    issue_certificate,
    lab,
    write_key,
    x509_name,
)
from support.tls import close, exchange, mtls, open_tls, refused_exchange, tls_gateway

ADT = message("adt_a01.hl7")  # MSH-3 SYNTHLAB, MSH-4 SYNTHHOSP
# The lab certificate's RDN sequence is CN, O: RFC 4514 writes it last RDN first.
LAB_SUBJECT = "O=Synthetic Lab,CN=lab.example"



def ack_code(ack: dict[str, list[list[str]]]) -> tuple[str, str]:
    msa = ack["MSA"][0]
    return msa[1], msa[2]


# -- TLS without client certificates --------------------------------------------------


async def test_tls_adt_is_accepted_and_plain_tcp_is_not(tmp_path: Path, pki: Pki) -> None:
    async with tls_gateway(tmp_path, pki) as gw:
        peer = await open_tls(gw.mllp_port, client_context(pki), "localhost")
        try:
            version = peer.writer.get_extra_info("ssl_object").version()
            assert version in ("TLSv1.2", "TLSv1.3")
            ack = segments(await peer.request(with_control_id(ADT, "TLS-1")))
            assert ack_code(ack) == ("AA", "TLS-1")
        finally:
            await close(peer)

        # Plain MLLP on the TLS port: the handshake fails, no ACK, the connection closes.
        plain = await MllpPeer.open(gw.mllp_port)
        try:
            await plain.send(with_control_id(ADT, "PLAIN-1"))
            received = b""
            while chunk := await asyncio.wait_for(plain.reader.read(65536), 5):
                received += chunk
        except (ConnectionError, asyncio.IncompleteReadError):
            received = b""
        finally:
            await close(plain)
        assert b"MSA" not in received and b"\x0b" not in received

        # The listener is unharmed: the next TLS client (checked by IP SAN) is served.
        ack = await exchange(gw.mllp_port, with_control_id(ADT, "TLS-2"), client_context(pki),
                             server_hostname="127.0.0.1")
        assert ack_code(ack) == ("AA", "TLS-2")
        assert await gw.inbox.count() == 2


def _tls11_client(pki: Pki) -> ssl.SSLContext:
    context = client_context(pki)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


async def _can_negotiate_tls11(pki: Pki) -> bool:
    """Whether this OpenSSL can do TLS 1.1 at all: against a server that allows it."""
    if not ssl.HAS_TLSv1_1:
        return False
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server.minimum_version = ssl.TLSVersion.TLSv1
        server.set_ciphers("DEFAULT:@SECLEVEL=0")
        server.load_cert_chain(pki.server_cert, pki.server_key)
        client = _tls11_client(pki)
    except (ValueError, ssl.SSLError):
        return False

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    probe = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=server)
    port = probe.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client), 5)
    except (OSError, TimeoutError):
        return False
    finally:
        probe.close()
    negotiated = writer.get_extra_info("ssl_object").version()
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    await probe.wait_closed()
    return bool(negotiated == "TLSv1.1")


async def test_tls_1_1_is_refused(tmp_path: Path, pki: Pki) -> None:
    if not await _can_negotiate_tls11(pki):
        pytest.skip("the local OpenSSL cannot negotiate TLS 1.1 even with a permissive server")
    async with tls_gateway(tmp_path, pki) as gw:
        how = await refused_exchange(gw.mllp_port, with_control_id(ADT, "OLD-1"),
                                     ssl=_tls11_client(pki))
        # The handshake itself fails (an SSLError, or a reset when the alert is dropped).
        assert how.startswith("connect:"), how

        # TLS 1.2 itself is still accepted (the floor is exactly 1.2).
        tls12 = client_context(pki)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        ack = await exchange(gw.mllp_port, with_control_id(ADT, "TLS12-1"), tls12)
        assert ack_code(ack) == ("AA", "TLS12-1")
        assert await gw.inbox.count() == 1


# -- mutual TLS ---------------------------------------------------------------------------


async def test_mtls_requires_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    async with tls_gateway(tmp_path, pki, **mtls(pki)) as gw:
        # TLS 1.2 fails the handshake; TLS 1.3 completes it client-side and the server's
        # alert arrives on the first read. Either way no ACK comes back.
        await refused_exchange(gw.mllp_port, with_control_id(ADT, "NOCERT-1"),
                               ssl=client_context(pki))
        assert await gw.inbox.count() == 0

        ack = await exchange(gw.mllp_port, with_control_id(ADT, "LAB-1"), lab(pki))
        assert ack_code(ack) == ("AA", "LAB-1")
        assert await gw.inbox.count() == 1


async def test_mtls_refuses_a_certificate_from_another_ca(tmp_path: Path, pki: Pki,
                                                          tmp_path_factory: pytest.TempPathFactory
                                                          ) -> None:
    other = tmp_path_factory.mktemp("other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509_name((NameOID.COMMON_NAME, "lab.example"), (NameOID.ORGANIZATION_NAME,
                                                         "Synthetic Lab"))
    self_signed = issue_certificate(name, name, key, key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    (other / "lab.pem").write_bytes(self_signed.public_bytes(serialization.Encoding.PEM))
    write_key(key, other / "lab.key")
    async with tls_gateway(tmp_path, pki, **mtls(pki)) as gw:
        await refused_exchange(gw.mllp_port, with_control_id(ADT, "FORGED-1"),
                               ssl=client_context(pki, other / "lab.pem", other / "lab.key"))
        assert await gw.inbox.count() == 0


# -- the sender allow-list ----------------------------------------------------------------


ALLOW_LAB = {"mllp.tls.allowed_senders": [
    {"subject": LAB_SUBJECT, "sending_application": "SYNTHLAB"},
]}


async def test_allow_list_binds_certificates_to_msh3(tmp_path: Path, pki: Pki) -> None:
    async with tls_gateway(tmp_path, pki, **mtls(pki, **ALLOW_LAB)) as gw:
        ack = await exchange(gw.mllp_port, with_control_id(ADT, "ALLOW-1"), lab(pki))
        assert ack_code(ack) == ("AA", "ALLOW-1")
        assert "ERR" not in ack
        assert await gw.inbox.count() == 1

        # A valid, CA-signed certificate with no rule.
        ack = await exchange(gw.mllp_port, with_control_id(ADT, "INTRUDER-1"), intruder(pki))
        assert ack_code(ack) == ("AR", "INTRUDER-1")
        assert "ERR" in ack
        assert await gw.inbox.count() == 1

        # The lab's certificate, but sending as another application.
        other_app = with_control_id(ADT, "SPOOF-1").replace(b"|SYNTHLAB|", b"|OTHERAPP|", 1)
        assert b"|OTHERAPP|" in other_app
        ack = await exchange(gw.mllp_port, other_app, lab(pki))
        assert ack_code(ack) == ("AR", "SPOOF-1")
        assert "ERR" in ack
        assert await gw.inbox.count() == 1


async def test_allow_list_checks_msh4_when_the_rule_names_a_facility(
        tmp_path: Path, pki: Pki) -> None:
    rules = {"mllp.tls.allowed_senders": [
        # Written with a space after the comma: subjects are compared as names.
        {"subject": "O=Synthetic Lab, CN=lab.example", "sending_application": "SYNTHLAB",
         "sending_facility": "SYNTHHOSP"},
    ]}
    async with tls_gateway(tmp_path, pki, **mtls(pki, **rules)) as gw:
        ack = await exchange(gw.mllp_port, with_control_id(ADT, "FAC-1"), lab(pki))
        assert ack_code(ack) == ("AA", "FAC-1")
        elsewhere = with_control_id(ADT, "FAC-2").replace(b"|SYNTHHOSP|", b"|OTHERHOSP|", 1)
        assert b"|OTHERHOSP|" in elsewhere
        ack = await exchange(gw.mllp_port, elsewhere, lab(pki))
        assert ack_code(ack) == ("AR", "FAC-2")
        assert await gw.inbox.count() == 1


# -- the command line ---------------------------------------------------------------------


@pytest.mark.slow
async def test_isthmus_send_over_mtls(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "adt.hl7"
    path.write_bytes(with_control_id(ADT, "CLI-TLS-1"))
    async with tls_gateway(tmp_path, pki, **mtls(pki, **ALLOW_LAB)) as gw:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "send", "--tls", "--tls-ca", str(pki.ca),
            "--tls-cert", str(pki.lab_cert), "--tls-key", str(pki.lab_key),
            "--host", "127.0.0.1", "--port", str(gw.mllp_port), "--timeout", "5", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == "CLI-TLS-1 AA"
        assert await gw.inbox.count() == 1


async def test_allow_list_is_not_fooled_by_a_comma_in_the_common_name(
        tmp_path: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Signed by the trusted CA, but its subject is one CN: "lab.example,O=Synthetic Lab".
    ca_key = serialization.load_pem_private_key((pki.ca.parent / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_name = x509.load_pem_x509_certificate(pki.ca.read_bytes()).subject
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_certificate(x509_name((NameOID.COMMON_NAME, "lab.example,O=Synthetic Lab")),
                             ca_name, ca_key, key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    out = tmp_path_factory.mktemp("spoof")
    (out / "spoof.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_key(key, out / "spoof.key")
    async with tls_gateway(tmp_path, pki, **mtls(pki, **ALLOW_LAB)) as gw:
        ack = await exchange(gw.mllp_port, with_control_id(ADT, "COMMA-1"),
                             client_context(pki, out / "spoof.pem", out / "spoof.key"))
        assert ack_code(ack) == ("AR", "COMMA-1")
        assert await gw.inbox.count() == 0
