"""Credentials for a real cluster: a TLS CA, the SuperLink's certificate, SuperNode keys.

Flower's SuperLink serves its APIs over TLS with a certificate the SuperNodes and the
``flwr`` CLI verify against a CA (``--root-certificates``); with
``--enable-supernode-auth`` it only lets in SuperNodes whose public key an operator
registered (``flwr supernode register KEY.pub``), each signing its requests with its
private key (``--auth-supernode-private-key``). This module writes all of it:

- ``ca.crt`` / ``ca.key``: a self-signed CA (keep ``ca.key`` off the devices);
- ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for
  the host names and addresses given (default ``127.0.0.1`` and ``localhost``; add the
  SuperLink machine's LAN address or name for a real cluster);
- ``nodes/NAME`` / ``nodes/NAME.pub``: one ECDSA P-384 key pair per SuperNode in OpenSSH
  format (the form ``flower-supernode`` and ``flwr supernode register`` read).

The ``cryptography`` package (a Flower dependency) does the work; nothing is downloaded.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devices.errors import ConfigError

__all__ = ["DEFAULT_HOSTS", "Credentials", "make_credentials", "make_node_key"]

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_VALID_DAYS = 365


@dataclass(frozen=True)
class Credentials:
    """Paths of the files ``make_credentials`` wrote."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]] = field(default_factory=dict)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        h = h.strip()
        if not h:
            raise ConfigError("hosts: expected host names or IP addresses, got an empty one")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tinyfleet"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def make_node_key(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write one SuperNode's ECDSA P-384 key pair (OpenSSH format); returns the paths.

    The private key stays on the device (``flower-supernode
    --auth-supernode-private-key``); the ``.pub`` file is what the operator registers.
    """
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"node name: expected a plain file name, got {name!r}")
    key = ec.generate_private_key(ec.SECP384R1())
    priv = Path(directory) / name
    pub = priv.with_name(name + ".pub")
    _write_private(priv, key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ))
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ) + f" tinyfleet-{name}\n".encode())
    return priv, pub


def make_credentials(
    directory: str | Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    nodes: Sequence[str] = (),
    days: int = _VALID_DAYS,
) -> Credentials:
    """Write a CA, a SuperLink certificate for ``hosts`` and key pairs for ``nodes``.

    Parameters
    ----------
    directory : path
        Where to write (created if missing). Existing files are overwritten.
    hosts : sequence of str
        Subject alternative names of the SuperLink: every address or name SuperNodes and
        the CLI use to reach it (an IP address becomes an IP SAN, anything else a DNS SAN).
    nodes : sequence of str
        SuperNode names; each gets ``nodes/NAME`` and ``nodes/NAME.pub``.
    days : int
        Validity of the certificates.
    """
    if not hosts:
        raise ConfigError("hosts: expected at least one host name or IP address")
    if days < 1:
        raise ConfigError(f"days: expected an integer >= 1, got {days}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("tinyfleet CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    paths = Credentials(
        root=root,
        ca_cert=root / "ca.crt",
        ca_key=root / "ca.key",
        server_cert=root / "server.crt",
        server_key=root / "server.key",
    )
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.ca_key, _pem_key(ca_key))
    paths.server_cert.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, _pem_key(srv_key))
    for name in nodes:
        paths.node_keys[name] = make_node_key(root / "nodes", name)
    return paths
