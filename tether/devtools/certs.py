"""A certificate authority and one member certificate for a quick start with TLS (DESIGN §13).

`tether certs create DIR` writes ``ca.crt``/``ca.key`` (a CA valid for ``days``) and
``tls.crt``/``tls.key`` (a certificate it signed for servers and clients alike, naming
``localhost``, ``127.0.0.1``, ``::1``, this host's name and any ``hosts`` given), the files a
Kubernetes TLS Secret holds. Keys are ECDSA P-256 and written with mode 0600. Every member of a
run can use the same pair: `--tls-cert DIR/tls.crt --tls-key DIR/tls.key --tls-ca DIR/ca.crt`.
For production, issue certificates from your own CA (cert-manager, Vault) into the same files.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DAYS = 365
_BOTH_WAYS = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


@dataclass(frozen=True, slots=True)
class CertFiles:
    ca: Path
    ca_key: Path
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tether"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # in order, once each
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def default_hosts() -> list[str]:
    return ["localhost", "127.0.0.1", "::1", socket.gethostname()]


def create_certs(
    directory: Path,
    hosts: Sequence[str] = (),
    *,
    days: int = DEFAULT_DAYS,
    reuse_ca: bool = True,
) -> CertFiles:
    """Write the CA (unless one is there and ``reuse_ca``) and a member certificate signed by
    it into ``directory``; returns the four paths. ValueError for a bad ``days`` or host."""
    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    for host in hosts:
        if not host or any(c.isspace() for c in host):
            raise ValueError(f"--hosts: {host!r} is not a host name or address")
    directory.mkdir(parents=True, exist_ok=True)
    files = CertFiles(
        directory / "ca.crt", directory / "ca.key", directory / "tls.crt", directory / "tls.key"
    )
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    if reuse_ca and files.ca.exists() and files.ca_key.exists():
        ca_cert = x509.load_pem_x509_certificate(files.ca.read_bytes())
        loaded = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{files.ca_key} is not the EC key `tether certs create` writes")
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("tether CA"))
            .issuer_name(_name("tether CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )  # fmt: skip
            .sign(ca_key, hashes.SHA256())
        )
        _write(files.ca_key, _key_pem(ca_key), private=True)
        _write(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    key = ec.generate_private_key(ec.SECP256R1())
    names = [*default_hosts(), *hosts]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("tether member"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(end, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(files.key, _key_pem(key), private=True)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files
