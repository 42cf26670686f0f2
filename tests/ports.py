"""Ports that stay ours for a whole test: never probed free, then closed, then bound by someone later.

A port found free and released before a child binds it (or between a child's exit and its restart) can be
given meanwhile to any other process that binds port 0, on a busy machine running several suites.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio


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


@contextmanager
def reserved_port() -> Iterator[int]:
    """A port of 127.0.0.1 that stays ours for the block: a child may listen on it, exit, and listen again.

    The socket is bound with SO_REUSEADDR and never listens. A listener that also sets SO_REUSEADDR (trio's
    open_tcp_listeners does, so the relay, the upstream and the fault proxy all do) may bind the same port
    by number, while the kernel never hands it to a bind to port 0 or to an outgoing connection: not while
    the child listens, and not between its exit and its restart. Nothing listening: connections are refused.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


async def connect_from(source: str, port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:port from the loopback address ``source`` (127.0.0.2 ... stand for other
    clients); the test is skipped where the machine cannot bind that source address."""
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        pytest.skip(f"cannot connect from {source}: {exc}")
    return trio.SocketStream(sock)
