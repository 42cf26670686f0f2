"""Ports for tests that need one nothing answers on."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def refused_port() -> Iterator[int]:
    """A port that refuses connections for as long as the block runs.

    The socket stays bound but never listens: a connection to it is refused, and no other process (another
    test's server binding port 0) can be given the port meanwhile, as it could be once a probe socket closed.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
