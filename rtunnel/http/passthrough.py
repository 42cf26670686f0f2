"""Protocol switches (SPEC.md 5.5): which requests may switch, and the raw byte pump both ends run after a 101.

A request switches protocols (WebSocket, or any other `Upgrade` token) only if it asks for it the HTTP/1.1 way
(`Connection: upgrade` plus `Upgrade`) and has no body. `h2c` is never offered onward: HTTP/2 is not spoken on
either side of the tunnel, so an `Upgrade: h2c` is dropped and the request goes on as ordinary HTTP/1.1.

After the 101, `pump` copies bytes between one TCP connection (the client's on the relay, the upstream's on
the agent) and the tunnel stream, in both directions at once, with the stream's flow control as the only
buffer bound. The end of one direction is passed on as a half-close (END_STREAM one way, a TCP FIN the other),
so the protocol's own close handshake (a WebSocket Close, say) runs to completion; the pump returns when both
directions are done (or HALF_CLOSE_TIMEOUT after the first one, if the other never ends). Nothing else times
out: an idle session stays up as long as its two ends want. Any failure aborts both sides: the stream is reset
and the TCP connection closed with an RST, so neither peer can mistake a broken session for a clean close.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from functools import partial

import trio

from protocol import ErrorCode

from ..link.mux import MuxStream, StreamReset
from .bridge import READ_SIZE
from .proxyheaders import Header, connection_tokens, strip_hop_by_hop

__all__ = [
    "HALF_CLOSE_TIMEOUT",
    "Pumped",
    "abort_socket",
    "pump",
    "upgrade_offer",
    "with_upgrade",
]

# Once one direction of a switched session has ended, how long the other may stay open (see pump()).
HALF_CLOSE_TIMEOUT = 30.0

# Never forwarded: "h2c" asks the next hop to speak HTTP/2 in clear text (RFC 7540 3.2), which the relay and
# the agent do not; dropping it is how an HTTP/1.1 intermediary declines it (the request stays HTTP/1.1).
_NEVER_OFFERED = frozenset([b"h2c"])


def upgrade_offer(headers: Iterable[Header]) -> bytes | None:
    """The `Upgrade` value to forward for a protocol-switch request, or None if it is not one.

    Requires `Connection: upgrade` and an `Upgrade` header; the protocols that cannot be switched to (h2c)
    are removed from the list, and None is returned when none is left."""
    items = list(headers)
    if b"upgrade" not in connection_tokens(items):
        return None
    offered: list[bytes] = []
    for name, value in items:
        if name.lower() != b"upgrade":
            continue
        for item in value.split(b","):
            token = item.strip(b" \t")
            if token and token.split(b"/", 1)[0].lower() not in _NEVER_OFFERED:
                offered.append(token)
    return b", ".join(offered) or None


def with_upgrade(headers: Iterable[Header], offer: bytes | None) -> list[Header]:
    """`headers` without hop-by-hop headers; with `offer`, the Upgrade and Connection headers the next hop
    needs to switch are added back (Upgrade without the protocols that were refused)."""
    out = strip_hop_by_hop(headers)
    if offer is not None:
        out += [(b"Upgrade", offer), (b"Connection", b"upgrade")]
    return out


@dataclasses.dataclass
class Pumped:
    """What one switched session carried, and why it ended abnormally (None: both sides closed cleanly)."""

    into_stream: int = 0  # bytes read from the TCP connection and sent on the stream
    out_of_stream: int = 0  # bytes received on the stream and written to the TCP connection
    error: str | None = None


def abort_socket(sock: trio.abc.Stream) -> None:
    """Close the TCP connection under `sock` at once with an RST (SO_LINGER 0): an abort, not an end."""
    raw = sock.transport_stream if isinstance(sock, trio.SSLStream) else sock
    if isinstance(raw, trio.SocketStream):
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.socket.close()


async def pump(
    stream: MuxStream,
    sock: trio.abc.Stream,
    *,
    initial: bytes = b"",
    what: str = "peer",
    half_close_timeout: float = HALF_CLOSE_TIMEOUT,
) -> Pumped:
    """Copy raw bytes both ways between `sock` and `stream` until both directions have ended.

    `initial`: bytes already read from `sock` (after the HTTP head) that belong to the new protocol. `what`
    names the TCP peer in error messages ("client", "upstream"). Never raises for I/O failures: they reset
    the stream, abort the socket and are reported in `Pumped.error`. Cancellation aborts both too.

    No deadline applies while both directions are open, however idle. Once one has ended, the other gets
    `half_close_timeout` seconds to end too (a peer that never closes after the other side did, as some
    WebSocket clients do after a server's close, must not hold the session forever)."""
    result = Pumped()
    clean = False
    try:
        async with trio.open_nursery() as nursery:
            session = _Session(result, what, half_close_timeout, nursery.cancel_scope)
            nursery.start_soon(
                session.direction, sock, stream, initial, session.into_stream, partial(_end_stream, stream)
            )
            nursery.start_soon(
                session.direction, stream, sock, b"", session.out_of_stream, partial(_half_close, sock)
            )
        if (
            result.error is None
            and session.ended == 1
            and trio.current_time() >= nursery.cancel_scope.deadline
        ):
            result.error = f"half-closed for {half_close_timeout:g} s without the other direction ending"
        clean = result.error is None
    finally:
        if not clean:
            stream.reset(ErrorCode.CANCEL)
            abort_socket(sock)
    return result


@dataclasses.dataclass
class _Session:
    """What the two directions of one pump share: the result, and the scope that ends them both."""

    result: Pumped
    what: str
    half_close_timeout: float
    scope: trio.CancelScope
    ended: int = 0  # directions that ended with a half-close

    async def direction(
        self,
        source: trio.abc.ReceiveStream,
        sink: trio.abc.SendStream,
        first: bytes,
        count: Callable[[int], None],
        end: Callable[[], Awaitable[bool]],
    ) -> None:
        """One direction, then `end()`: True if the other may go on (a half-close), False if not."""
        try:
            await _copy(source, sink, first, count)
            half_closed = await end()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if self.result.error is None:
                self.result.error = _failure(exc, self.what)
            self.scope.cancel()
            return
        if not half_closed:
            self.scope.cancel()  # the session is over in both directions
            return
        self.ended += 1
        if self.ended == 1:  # the other direction now has half_close_timeout to end too
            self.scope.deadline = trio.current_time() + self.half_close_timeout

    def into_stream(self, size: int) -> None:
        self.result.into_stream += size

    def out_of_stream(self, size: int) -> None:
        self.result.out_of_stream += size


async def _copy(
    source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, first: bytes, count: Callable[[int], None]
) -> None:
    """One direction: what `source` gives (after `first`) into `sink`, until the source ends."""
    data: bytes | bytearray = first
    while True:
        if data:
            await sink.send_all(data)
            count(len(data))
        data = await source.receive_some(READ_SIZE)
        if not data:
            return


async def _end_stream(stream: MuxStream) -> bool:
    await stream.send_eof()  # END_STREAM: failing to send it fails the session
    return True


async def _half_close(sock: trio.abc.Stream) -> bool:
    """Pass the stream's END on to the TCP peer as a FIN; False if `sock` cannot be half-closed (TLS): the
    session then ends in both directions (the caller's MuxStream.close() resets what of ours is open)."""
    if not isinstance(sock, trio.abc.HalfCloseableStream):
        return False
    # If the TCP peer no longer takes a FIN, its own direction tells how the session ends.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await sock.send_eof()
    return True


def _failure(exc: BaseException, what: str) -> str:
    """Why a session failed: the stream's reset as it was reported, or the TCP peer's error."""
    if isinstance(exc.__cause__, StreamReset):
        return str(exc.__cause__)
    return f"{what} connection failed: {exc.__cause__ or exc or type(exc).__name__}"
