"""Fixtures for tests/rtunnel: the transport tests' fixtures live in transport_common.py."""

from .transport_common import ca, client_ssl, echo_url, server_ssl, tr

__all__ = ["ca", "client_ssl", "echo_url", "server_ssl", "tr"]
