"""The local stack's gRPC certificates and the security.toml sections naming them, without a
server (tests/test_security.py checks that a `weed shell` without them is refused)."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from readmission.localstack import seaweed
from readmission.localstack.seaweed_tls import write_grpc_certificates


def test_the_certificate_is_signed_by_the_fresh_ca_for_server_and_client_use(
    tmp_path: Path,
) -> None:
    tls = write_grpc_certificates(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for path in (tls.ca, tls.cert, tls.key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == [
        "ca.crt",
        "grpc.crt",
        "grpc.key",
    ]

    before = (tls.ca.read_bytes(), tls.key.read_bytes())
    again = write_grpc_certificates(tmp_path / "tls")  # every start: a new CA, a new key
    assert before[0] != again.ca.read_bytes() and before[1] != again.key.read_bytes()


def test_security_toml_requires_the_certificate_on_every_grpc_port(tmp_path: Path) -> None:
    tls = write_grpc_certificates(tmp_path / "tls")
    path = tmp_path / "security.toml"
    seaweed.write_security_config(path, tls)
    config = tomllib.loads(path.read_text())
    assert config["grpc"]["ca"] == str(tls.ca)
    for component in ("master", "volume", "filer", "s3", "client"):
        assert config["grpc"][component] == {"cert": str(tls.cert), "key": str(tls.key)}
    assert config["jwt"]["filer_signing"]["read"]["key"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    seaweed.write_security_config(path)  # without certificates: no gRPC section
    assert "grpc" not in tomllib.loads(path.read_text())


def test_the_keys_are_p256(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    tls = write_grpc_certificates(tmp_path / "tls")
    key = load_pem_private_key(tls.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
