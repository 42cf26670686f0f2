"""The agent's connections to its upstream HTTP server: h11 client connections and a keep-alive pool.

The pool holds only *idle* connections; a connection in use belongs to exactly one exchange, which either
gives it back (`release`, which keeps it only if it is cleanly reusable) or drops it (`discard`). Anything
doubtful is closed rather than reused: a connection that carried half an exchange could hand the next request
the rest of an old response.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from collections import deque
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import h11
import trio

from ..http.bridge import READ_SIZE
from ..net import fastsend

__all__ = [
    "UpstreamAddress",
    "UpstreamBroken",
    "UpstreamConnectError",
    "UpstreamConnection",
    "UpstreamPool",
    "UpstreamStalled",
    "parse_upstream_url",
]

log = logging.getLogger("rtunnel.agent.upstream")

# Largest response head we parse. The tunnel's own limit (MAX_HEAD_SIZE, 64 KiB by default) applies when the
# head is forwarded; h11 only enforces its limit while a head is incomplete, so a head can exceed this by up
# to one read.
MAX_RESPONSE_HEAD: Final = 65536


@dataclass(frozen=True, slots=True)
class UpstreamAddress:
    host: str
    port: int

    @property
    def authority(self) -> bytes:
        """The value for a Host header naming the upstream itself (IPv6 literals in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}".encode("ascii")

    def __str__(self) -> str:
        return self.authority.decode("ascii")


def parse_upstream_url(url: str) -> UpstreamAddress:
    """Parse ``http://host[:port][/]``; anything else raises ValueError with a message for the user."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"upstream URL {url!r} is invalid: {exc}") from None
    if parts.scheme != "http":
        raise ValueError(f"upstream URL {url!r} must start with http:// (https upstreams are not supported)")
    if not parts.hostname:
        raise ValueError(f"upstream URL {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"upstream URL {url!r} must not carry credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"upstream URL {url!r} must be just http://host:port (a path prefix is not supported)"
        )
    return UpstreamAddress(parts.hostname, 80 if port is None else port)


class UpstreamConnectError(Exception):
    """No connection to the upstream. `status` is what the client should get (502, or 504 on timeout)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class UpstreamBroken(Exception):
    """The upstream connection failed: EOF or reset where a message was due, or an invalid response."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamStalled(Exception):
    """A send to the upstream made no progress within the stall timeout (it stopped reading)."""


def _describe_connect_error(exc: OSError, address: UpstreamAddress) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve upstream host {address.host!r}: {exc.strerror}"
    # trio's open_tcp_stream raises one OSError whose cause groups the error of every address it tried.
    errors: list[BaseException] = [exc]
    if isinstance(exc.__cause__, BaseExceptionGroup):
        errors = list(exc.__cause__.exceptions)
    for error in errors:
        if isinstance(error, ConnectionRefusedError):
            return f"upstream refused connection at {address}"
    for error in errors:
        if isinstance(error, OSError) and error.errno is not None:
            return f"cannot connect to upstream at {address}: {errno.errorcode.get(error.errno, error.errno)}"
    return f"cannot connect to upstream at {address}: {exc}"


def _is_readable(sock: trio.socket.SocketType) -> bool:
    """True if the socket has data or EOF pending right now (never blocks)."""
    fd = sock.fileno()
    if fd < 0:
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


class UpstreamConnection:
    """One TCP connection to the upstream with its h11 client state.

    One task may send and another receive at the same time (that is how a request body and an early
    response overlap); never two senders.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.exchanges = 0  # completed exchanges before the current one
        self.bytes_received = 0  # in the current exchange
        self.saw_eof = False
        # True while a send is in progress and after one failed or was cancelled: the bytes on the wire no
        # longer match h11's idea of them, so the connection must never be reused.
        self.broken = False
        self.closed = False
        self.idle_since = 0.0

    @property
    def reused(self) -> bool:
        return self.exchanges > 0

    async def send(self, event: h11.Event, *more: h11.Event, stall_timeout: float) -> None:
        """Send events in one write. Raises h11.LocalProtocolError (bad event, e.g. body longer than
        Content-Length), UpstreamStalled or UpstreamBroken."""
        data = self.h11.send(event)
        if more:
            data = b"".join([data or b"", *(self.h11.send(extra) or b"" for extra in more)])
        if not data:
            return
        self.broken = True
        left = fastsend.send_nowait(self.stream, data)
        if not left:  # all taken at once (the usual case): no stall possible, no scope to enter
            self.broken = False
            return
        with trio.move_on_after(stall_timeout) as scope:
            try:
                await fastsend.send_all(self.stream, left)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamBroken(f"upstream connection failed while sending: {_cause(exc)}") from None
        if scope.cancelled_caught:
            raise UpstreamStalled(f"upstream accepted no request bytes for {stall_timeout:g} s")
        self.broken = False

    async def next_event(self) -> h11.Event:
        """The next response event, reading 64 KiB at a time. Raises UpstreamBroken."""
        while (event := self.next_event_nowait()) is None:
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamBroken(f"upstream connection failed: {_cause(exc)}") from None
            self._received(data)
        return event

    def receive_nowait(self) -> bool:
        """Give h11 what the socket holds right now (bytes, or the upstream's EOF) without waiting: False if
        it holds nothing, or is not a plain socket this can read. Raises UpstreamBroken."""
        fd = fastsend.direct_fd(self.stream)
        if fd is None:
            return False
        try:
            data = os.read(fd, READ_SIZE)  # trio's sockets are non-blocking; read(2) on one is recv(2)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise UpstreamBroken(f"upstream connection failed: {_cause(exc)}") from None
        self._received(data)
        return True

    def _received(self, data: bytes) -> None:
        if not data:
            self.saw_eof = True
        self.bytes_received += len(data)
        self.h11.receive_data(data)

    def next_event_nowait(self) -> h11.Event | None:
        """The next response event if its bytes already arrived, else None. Raises UpstreamBroken."""
        try:
            event = self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            if self.saw_eof:
                if self.bytes_received == 0:
                    raise UpstreamBroken("upstream closed the connection without responding") from None
                raise UpstreamBroken("upstream closed the connection in the middle of a response") from None
            if "_SWITCH_UPGRADE" in str(exc):
                # h11 accepts a 101 only in answer to a request that offered Upgrade (see agent/exchange.py).
                raise UpstreamBroken(
                    "upstream switched protocols (101) for a request that did not ask to"
                ) from None
            raise UpstreamBroken(f"upstream sent an invalid response: {exc}") from None
        if event is h11.NEED_DATA:
            return None
        if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            raise UpstreamBroken("upstream connection ended unexpectedly")
        assert isinstance(event, h11.Event)
        return event

    def reusable(self) -> bool:
        """Start the next cycle if the connection is cleanly reusable; False if it must be closed."""
        conn = self.h11
        if self.closed or self.broken or self.saw_eof:
            return False
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return False
        # Bytes after a complete response are a protocol violation (or an unsolicited answer to nothing).
        return conn.trailing_data == (b"", False)

    def close(self) -> None:
        """Close at once (sync, so it works in `finally` blocks under cancellation)."""
        if not self.closed:
            self.closed = True
            self.stream.socket.close()


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__
    if isinstance(inner, OSError) and inner.errno is not None:
        return errno.errorcode.get(inner.errno, str(inner))
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc))
    return str(exc) or type(exc).__name__


class UpstreamPool:
    """Keep-alive connections to one upstream address.

    At most `max_idle` idle connections are kept, each for at most `idle_timeout` seconds. Expiry is
    checked whenever the pool is used; `run()` (optional, in the agent's nursery) also closes them on time
    when no traffic comes. Connections in use are not limited here: the tunnel's stream limit bounds them.
    """

    def __init__(
        self,
        address: UpstreamAddress,
        *,
        connect_timeout: float = 10,
        max_idle: int = 32,
        idle_timeout: float = 30,
    ) -> None:
        if max_idle < 0:
            raise ValueError("max_idle must be >= 0")
        self.address = address
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: deque[UpstreamConnection] = deque()  # oldest on the left, most recently used on the right
        self._idle_added = trio.Event()
        self._closed = False
        self.connections_opened = 0
        self.in_use = 0

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def acquire(self, *, fresh: bool = False) -> UpstreamConnection:
        """An idle connection if one is usable (unless `fresh`), else a new one. Raises UpstreamConnectError."""
        if self._closed:
            raise UpstreamConnectError(502, "agent is shutting down")
        self._prune(trio.current_time())
        while self._idle and not fresh:
            conn = self._idle.pop()  # the warmest: least likely to have been timed out by the upstream
            # An idle HTTP/1.1 connection has nothing to say; readable means EOF (the upstream timed it out)
            # or junk. Either way it is dead: checking here avoids most of the retry-on-stale-connection cases.
            if _is_readable(conn.stream.socket):
                conn.close()
                continue
            conn.bytes_received = 0
            self.in_use += 1
            return conn
        conn = await self._connect()
        self.in_use += 1
        return conn

    async def _connect(self) -> UpstreamConnection:
        address = self.address
        with trio.move_on_after(self.connect_timeout) as scope:
            try:
                stream = await trio.open_tcp_stream(address.host, address.port)
            except OSError as exc:
                raise UpstreamConnectError(502, _describe_connect_error(exc, address)) from None
        if scope.cancelled_caught:
            raise UpstreamConnectError(
                504, f"upstream at {address} did not accept a connection within {self.connect_timeout:g} s"
            )
        self.connections_opened += 1
        return UpstreamConnection(stream)

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection after a finished exchange: kept if cleanly reusable, else closed."""
        self.in_use -= 1
        if self._closed or self.max_idle == 0 or not conn.reusable():
            conn.close()
            return
        conn.exchanges += 1
        conn.bytes_received = 0
        conn.idle_since = trio.current_time()
        self._idle.append(conn)
        while len(self._idle) > self.max_idle:
            self._idle.popleft().close()
        self._idle_added.set()

    def discard(self, conn: UpstreamConnection) -> None:
        """Close a connection whose exchange did not finish cleanly."""
        self.in_use -= 1
        conn.close()

    def _prune(self, now: float) -> None:
        while self._idle and now - self._idle[0].idle_since >= self.idle_timeout:
            self._idle.popleft().close()

    async def run(self) -> None:
        """Close idle connections as they expire; runs until cancelled."""
        while not self._closed:
            self._prune(trio.current_time())
            if self._idle:
                await trio.sleep_until(self._idle[0].idle_since + self.idle_timeout)
            else:
                self._idle_added = trio.Event()
                await self._idle_added.wait()

    def close(self) -> None:
        """Close every idle connection; connections given back later are closed too."""
        self._closed = True
        while self._idle:
            self._idle.popleft().close()
        self._idle_added.set()
