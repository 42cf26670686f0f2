"""Turning command-line text into validated settings. Every failure is a ConfigError with a one-line message."""

from __future__ import annotations

import dataclasses
import os
import ssl
from pathlib import Path


class ConfigError(Exception):
    """Bad configuration: the CLI prints the message and exits non-zero, without a traceback."""


def parse_address(text: str, option: str, *, default_host: str | None = None) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port). Port 0 asks the OS for a free port.

    With `default_host`, ':PORT' and a bare 'PORT' are accepted too and bind to that host.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep and default_host is not None:
        port_text = text
    elif not sep or (not host and default_host is None):
        raise ConfigError(f"{option}: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or (default_host or "")
    try:
        port = int(port_text)
    except ValueError:
        if default_host is not None:
            raise ConfigError(f"{option}: expected [HOST:]PORT, got {text!r}") from None
        raise ConfigError(f"{option}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{option}: port {port} is outside 0..65535")
    return host, port


@dataclasses.dataclass(frozen=True)
class TokenGroup:
    """One token the relay accepts, and a label for logs. The token itself is never printed (repr=False)."""

    label: str
    token: bytes = dataclasses.field(repr=False)

    def __str__(self) -> str:
        return self.label


def read_token_file(path: str) -> list[TokenGroup]:
    """Tokens from a file, one per line; blank lines and lines starting with '#' are ignored.

    A comment after a token on its line (``TOKEN  # ci runners``) becomes its label in logs; without one the
    label is the line number. Messages never quote a token.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise ConfigError(f"--token-file: cannot read {path}: {reason}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--token-file: {path} is not UTF-8 text") from None
    groups: list[TokenGroup] = []
    seen: set[bytes] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token, *more = line.split(None, 1)
        rest = more[0] if more else ""
        if rest and not rest.startswith("#"):
            raise ConfigError(f"--token-file: {path} line {number}: a token must not contain white space")
        _check_token(token, f"--token-file: {path} line {number}")
        label = rest.lstrip("#").strip() or f"line {number}"
        if token.encode() not in seen:
            seen.add(token.encode())
            groups.append(TokenGroup(f"token {label!r}", token.encode()))
    if not groups:
        raise ConfigError(f"--token-file: {path} contains no token")
    return groups


def _check_token(token: str, where: str) -> None:
    if any(ch.isspace() for ch in token):
        raise ConfigError(f"{where}: the token must not contain white space")
    if not (token.isascii() and token.isprintable()):
        raise ConfigError(f"{where}: the token must be printable ASCII")


def load_tokens(token: str | None, token_file: str | None) -> list[TokenGroup]:
    """The relay's tokens: --token, else every token of --token-file, else $RTUNNEL_TOKEN; [] when none."""
    if token is not None and token_file is not None:
        raise ConfigError("give either --token or --token-file, not both")
    if token_file is not None:
        return read_token_file(token_file)
    if token is None:
        token = os.environ.get("RTUNNEL_TOKEN") or None
    if token is None:
        return []
    _check_token(token, "token")
    return [TokenGroup("the token", token.encode())]


def load_token(token: str | None, token_file: str | None) -> str | None:
    """The agent's token from --token, else --token-file (exactly one token), else $RTUNNEL_TOKEN; None when
    none is set."""
    if token is not None and token_file is not None:
        raise ConfigError("give either --token or --token-file, not both")
    if token_file is not None:
        groups = read_token_file(token_file)
        if len(groups) != 1:
            raise ConfigError(
                f"--token-file: {token_file} must hold exactly one token here, not {len(groups)}"
            )
        return groups[0].token.decode()
    if token is None:
        token = os.environ.get("RTUNNEL_TOKEN") or None
    if token is not None:
        _check_token(token, "token")
    return token


TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def server_tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # Modern defaults: TLS 1.2 or later; for TLS 1.2, only forward-secret AEAD suites (TLS 1.3's suites are
    # all of that kind and are not affected by set_ciphers); no compression (CRIME), no renegotiation.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    hint = " (`rtunnel cert --host NAME` makes both)"
    _check_pem(cert, "--tls-cert", "CERTIFICATE", "a PEM certificate", hint)
    _check_pem(key, "--tls-key", "PRIVATE KEY", "a PEM private key", hint)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"--tls-key {key} is not the key of --tls-cert {cert}") from None
        raise ConfigError(
            f"--tls-cert {cert}, --tls-key {key}: cannot use them: {_ssl_reason(exc)}"
        ) from None
    return context


def _check_pem(path: str, option: str, label: str, what: str, missing_hint: str = "") -> None:
    """A readable file with a PEM block of `label` in it: what `ssl` would otherwise call a "PEM lib" error."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        hint = missing_hint if isinstance(exc, FileNotFoundError) else ""
        raise ConfigError(f"{option} {path}: cannot read it: {reason}{hint}") from None
    if f"{label}-----".encode() not in text:
        raise ConfigError(f"{option} {path}: not {what} (no '-----BEGIN ...{label}-----' block)")


def _ssl_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    return (exc.strerror or str(exc)).lower()


def client_tls_context(ca: str | None, insecure: bool) -> ssl.SSLContext:
    if ca is not None:
        _check_pem(ca, "--ca", "CERTIFICATE", "a PEM certificate bundle")
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca {ca}: cannot use it: {_ssl_reason(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
