"""Turning command-line text into validated settings. Every failure is a ConfigError with a one-line message."""

from __future__ import annotations

import os
import ssl
from pathlib import Path


class ConfigError(Exception):
    """Bad configuration: the CLI prints the message and exits non-zero, without a traceback."""


def parse_address(text: str, option: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port). Port 0 asks the OS for a free port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{option}: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{option}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{option}: port {port} is outside 0..65535")
    return host, port


def load_token(token: str | None, token_file: str | None) -> str | None:
    """The token from --token, else --token-file, else $RTUNNEL_TOKEN; None when none is set."""
    if token is not None and token_file is not None:
        raise ConfigError("give either --token or --token-file, not both")
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--token-file: cannot read {token_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--token-file: {token_file} is not UTF-8 text") from None
        if not token:
            raise ConfigError(f"--token-file: {token_file} is empty")
    if token is None:
        token = os.environ.get("RTUNNEL_TOKEN") or None
    if token is not None and any(ch.isspace() for ch in token):
        raise ConfigError("the token must not contain white space")
    return token


def server_tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate/key ({cert}, {key}): {exc}") from None
    return context


def client_tls_context(ca: str | None, insecure: bool) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca: cannot load {ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
