"""`rtunnel cert` and `rtunnel token`: TLS for the agents' listener, and secrets, without openssl recipes.

`make_relay_cert` keeps a private CA in DIR (`ca.pem`, `ca-key.pem`; made on first use, reused after) and issues
the relay's certificate from it (`relay.pem`, `relay-key.pem`). Agents trust that CA with `dial --ca ca.pem`,
so nothing about the relay's name has to be in a public CA's hands. Private keys are written 0600, and every
file is replaced atomically, so a relay reading them never sees half a file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..config import ConfigError

__all__ = ["make_relay_cert", "new_token"]

CA_CERT: Final = "ca.pem"
CA_KEY: Final = "ca-key.pem"
RELAY_CERT: Final = "relay.pem"
RELAY_KEY: Final = "relay-key.pem"
CA_DAYS: Final = 3650
_DNS_NAME: Final = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def new_token() -> str:
    """A random token: 32 bytes (256 bits), URL-safe base64, so it fits a header, a file line or a variable."""
    return secrets.token_urlsafe(32)


def make_relay_cert(hosts: Sequence[str], out: Path, *, days: int = 825) -> list[str]:
    """Write the CA (unless DIR has one) and a relay certificate for `hosts`; return the lines to print."""
    names = [_subject_name(host) for host in hosts]
    if days < 1:
        raise ConfigError("--days must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, made_ca = _load_or_make_ca(out)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), now, not_after)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / RELAY_KEY, _key_pem(key), private=True)
    _write(out / RELAY_CERT, _cert_pem(cert), private=False)
    return _report(hosts, out, made_ca, not_after)


def _report(hosts: Sequence[str], out: Path, made_ca: bool, not_after: datetime.datetime) -> list[str]:
    def path(name: str) -> str:
        return shlex.quote(str(out / name))

    host = f"[{hosts[0]}]" if ":" in hosts[0] else hosts[0]
    ca = "made a new private CA" if made_ca else "reused the CA"
    return [
        f"{ca} ({path(CA_CERT)}, key {path(CA_KEY)}) and wrote {path(RELAY_CERT)}, {path(RELAY_KEY)} for "
        f"{', '.join(hosts)} (valid until {not_after:%Y-%m-%d})",
        "",
        "relay:",
        f"  rtunnel serve --agents 0.0.0.0:8443 --tls-cert {path(RELAY_CERT)} --tls-key {path(RELAY_KEY)}",
        f"agent (copy {path(CA_CERT)} there; never {path(CA_KEY)}):",
        f"  rtunnel dial wss://{host}:8443 --ca {CA_CERT} --upstream PORT",
    ]


def _subject_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not (host.isascii() and len(host) <= 253 and _DNS_NAME.fullmatch(host)):
        raise ConfigError(f"--host {host!r}: not a DNS name or an IP address (use the ASCII form, xn--...)")
    return x509.DNSName(host.lower())


def _load_or_make_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if cert_path.exists() or key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{exc.filename} is missing: the CA needs both {CA_CERT} and {CA_KEY}"
            ) from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cannot use the CA in {out}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
            raise ConfigError(f"{key_path} is not the key of {cert_path} (or not one `rtunnel cert` made)")
        if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
            raise ConfigError(f"the CA {cert_path} has expired: move it away to make a new one")
        return cert, key, False
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"rtunnel private CA {secrets.token_hex(4)}")])
    cert = (
        _builder(name, now, now + datetime.timedelta(days=CA_DAYS))
        .issuer_name(name)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, _cert_pem(cert), private=False)
    return cert, key, True


def _builder(
    subject: x509.Name, not_before: datetime.datetime, not_after: datetime.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before - datetime.timedelta(minutes=5))  # clocks a little behind
        .not_valid_after(not_after)
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Replace `path` atomically; a private key is 0600 from its first byte (mkstemp), a certificate 0644."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            if not private:
                os.fchmod(file.fileno(), 0o644)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
