"""Mutual TLS for SeaweedFS's gRPC ports in the local stack: a private CA and one certificate.

SeaweedFS's gRPC ports (master, volume, filer, S3) accept renames, deletes and file-id
lookups without any key unless `security.toml` names a CA and certificates (`[grpc]`,
`[grpc.<component>]`, `[grpc.client]`); then every gRPC connection must present a certificate
signed by that CA (SeaweedFS does not check host names, so one certificate serves every
component as server and as client).

Contract: `write_grpc_certificates(directory)` writes, fresh at every call, `ca.crt`,
`grpc.crt` and `grpc.key` (the key and the directory mode 0600/0700; the CA's private key is
never written: nothing can sign another certificate after this call). The files are only
readable by the user running the stack: a `weed shell` (or any gRPC client) without them is
refused at the TLS handshake.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from readmission.localstack.private_files import write_private

# Long enough for any local stack run; the files are rewritten at every start.
VALIDITY = datetime.timedelta(days=30)
COMMON_NAME = "readmission-localstack-seaweedfs"


@dataclass(frozen=True)
class GrpcTls:
    """Paths of the CA certificate and of the certificate and key every component uses."""

    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_grpc_certificates(directory: Path) -> GrpcTls:
    """A fresh CA and a certificate (server and client use) signed by it, under `directory`."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + VALIDITY
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{COMMON_NAME}-ca")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(COMMON_NAME))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    tls = GrpcTls(directory / "ca.crt", directory / "grpc.crt", directory / "grpc.key")
    write_private(tls.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_private(tls.cert, cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(tls.key, key_pem)
    return tls
