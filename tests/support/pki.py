"""A throwaway PKI for TLS tests: a CA, a server certificate and two client certificates,
made once per session with `cryptography`."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# -- a throwaway PKI --------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    lab_cert: Path
    lab_key: Path
    intruder_cert: Path
    intruder_key: Path
    # Made like `openssl req -subj "/O=Example Lab/CN=lab.example"`: O first in the DER.
    example_lab_cert: Path
    example_lab_key: Path


def x509_name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def issue_certificate(subject: x509.Name, ca_name: x509.Name, ca_key: ec.EllipticCurvePrivateKey,
           key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
           usage: x509.ObjectIdentifier | None = None,
           san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False), critical=True)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    pem = serialization.Encoding.PEM

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509_name((NameOID.COMMON_NAME, "Isthmus Test CA"))
    ca_cert = issue_certificate(ca_name, ca_name, ca_key, ca_key, ca=True)
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    write_key(ca_key, out / "ca.key")

    def leaf(stem: str, subject: x509.Name, usage: x509.ObjectIdentifier,
             san: list[x509.GeneralName] | None = None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_certificate(subject, ca_name, ca_key, key, usage=usage, san=san)
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(pem))
        write_key(key, out / f"{stem}.key")

    leaf("server", x509_name((NameOID.COMMON_NAME, "localhost")), ExtendedKeyUsageOID.SERVER_AUTH,
         [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    # RDN sequence CN, O: RFC 4514 writes the last RDN first, "O=Synthetic Lab,CN=lab.example".
    leaf("lab", x509_name((NameOID.COMMON_NAME, "lab.example"),
                      (NameOID.ORGANIZATION_NAME, "Synthetic Lab")),
         ExtendedKeyUsageOID.CLIENT_AUTH)
    # RDN sequence O, CN (the usual order): "CN=lab.example,O=Example Lab".
    leaf("example-lab", x509_name((NameOID.ORGANIZATION_NAME, "Example Lab"),
                              (NameOID.COMMON_NAME, "lab.example")),
         ExtendedKeyUsageOID.CLIENT_AUTH)
    leaf("intruder", x509_name((NameOID.COMMON_NAME, "intruder.example")),
         ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(out / "ca.pem", out / "server.pem", out / "server.key", out / "lab.pem",
               out / "lab.key", out / "intruder.pem", out / "intruder.key",
               out / "example-lab.pem", out / "example-lab.key")


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None
                   ) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def lab(pki: Pki) -> ssl.SSLContext:
    return client_context(pki, pki.lab_cert, pki.lab_key)


def intruder(pki: Pki) -> ssl.SSLContext:
    return client_context(pki, pki.intruder_cert, pki.intruder_key)
