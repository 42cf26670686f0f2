"""Ports that stay ours for a whole test: never probed free, then closed, then bound by someone later."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def bound_socket() -> Iterator[socket.socket]:
    """A TCP socket bound to a port of 127.0.0.1 the OS picks, not listening, closed after the block.

    Until something listens on it, a connection to the port is refused; and no other process (another
    test's server binding port 0) can be given the port meanwhile, as it could once a probe socket closed.
    Hand it to a child that must listen on a port we know beforehand (``pass_fds``).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


@contextmanager
def refused_port() -> Iterator[int]:
    """A port that refuses connections for as long as the block runs (see bound_socket)."""
    with bound_socket() as sock:
        yield int(sock.getsockname()[1])
