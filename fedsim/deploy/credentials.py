"""Credentials for a deployment: a certificate authority, the SuperLink's TLS
certificate, and one authentication key pair per SuperNode, made with ``cryptography``
(never by shelling out to openssl, never by hand).

For a test or a small lab. A production site uses its own CA; every file here has the
format Flower 1.39 reads, so the two mix:

- ``ca.pem`` (the CA certificate every party trusts; ``ca.key`` stays with whoever signs),
- ``superlink.pem`` / ``superlink.key`` (the SuperLink's certificate for its Fleet API and
  its HTTPS Control/Runtime API, valid for the names and addresses given),
- ``nodes/node-K`` (the SuperNode's private key, OpenSSH format, as
  ``flower-supernode --auth-supernode-private-key`` reads it) and ``nodes/node-K.pub``
  (its public key, OpenSSH format, as ``flwr supernode register`` reads it).

Keys are ECDSA on NIST P-384 (Flower's node authentication accepts only NIST curves).
Private keys are written with mode 0600. A folder is written whole or not at all: the
files go to a temporary folder beside it that is renamed into place at the end.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Credentials", "make_credentials", "node_public_keys"]

CURVE = ec.SECP384R1()
CA_FILE, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.pem", "superlink.key"
NODES_DIR = "nodes"
LOOPBACK = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Credentials:
    """The files of a credentials folder (see the module docstring)."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / CA_FILE

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    def node_key(self, k: int) -> Path:
        return self.root / NODES_DIR / f"node-{k}"

    def node_public_key(self, k: int) -> Path:
        return self.root / NODES_DIR / f"node-{k}.pub"

    def missing(self) -> list[Path]:
        """The SuperLink's files that are not there."""
        return [p for p in (self.ca, self.server_cert, self.server_key) if not p.is_file()]


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsim lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_credentials(
    out: Path,
    *,
    hosts: list[str],
    nodes: int,
    days: int = 365,
) -> Credentials:
    """Write a new credentials folder ``out`` (it must not exist): a CA, a SuperLink
    certificate valid for ``hosts`` (names or IP addresses the nodes dial; 127.0.0.1 and
    localhost are always added, where the coordinator reaches it), and
    ``nodes`` SuperNode key pairs. Raises FileExistsError if ``out`` exists and
    ValueError for no host or a negative count."""
    if not hosts:
        raise ValueError("at least one host name or address for the SuperLink certificate")
    if nodes < 0:
        raise ValueError(f"nodes must be >= 0, got {nodes}")
    # The coordinator reaches the SuperLink's HTTP API on its own loopback.
    hosts = [*hosts, *(h for h in LOOPBACK if h not in hosts)]
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists (credentials are never overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(CURVE)
    ca_name = _name("fedsim lab CA")
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
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / NODES_DIR).mkdir()
        _write(tmp / CA_FILE, ca_cert.public_bytes(serialization.Encoding.PEM))
        _write(tmp / CA_KEY, _private_pem(ca_key), private=True)
        _write(tmp / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
        _write(tmp / SERVER_KEY, _private_pem(server_key), private=True)
        for k in range(nodes):
            key = ec.generate_private_key(CURVE)
            private = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
            public = key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            _write(tmp / NODES_DIR / f"node-{k}", private, private=True)
            _write(tmp / NODES_DIR / f"node-{k}.pub", public + b"\n")
        tmp.chmod(0o700)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Credentials(out)


def node_public_keys(folder: Path) -> dict[str, bytes]:
    """Every ``*.pub`` SuperNode key in ``folder``, by file stem, as the PEM
    SubjectPublicKeyInfo bytes the SuperLink registers. Raises ValueError naming a file
    that is not an OpenSSH ECDSA public key on a NIST curve."""
    keys: dict[str, bytes] = {}
    for path in sorted(Path(folder).glob("*.pub")):
        try:
            key = serialization.load_ssh_public_key(path.read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: not an OpenSSH public key ({e})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
            "secp256r1",
            "secp384r1",
            "secp521r1",
        ):
            raise ValueError(f"{path}: not an ECDSA key on a NIST curve")
        keys[path.stem] = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return keys
