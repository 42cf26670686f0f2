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
    ended = 0
    try:
        async with trio.open_nursery() as nursery:

            def fail(why: str) -> None:
                if result.error is None:
                    result.error = why
                nursery.cancel_scope.cancel()

            async def direction(copy: Callable[..., Awaitable[None]], *args: object) -> None:
                nonlocal ended
                await copy(*args)
                if result.error is None:
                    ended += 1
                    if ended == 1:  # the other direction now has half_close_timeout to end too
                        nursery.cancel_scope.deadline = trio.current_time() + half_close_timeout

            nursery.start_soon(direction, _socket_to_stream, stream, sock, initial, result, fail, what)
            nursery.start_soon(
                direction, _stream_to_socket, stream, sock, result, fail, what, nursery.cancel_scope
            )
        if result.error is None and ended == 1 and trio.current_time() >= nursery.cancel_scope.deadline:
            result.error = f"half-closed for {half_close_timeout:g} s without the other direction ending"
        clean = result.error is None
    finally:
        if not clean:
            stream.reset(ErrorCode.CANCEL)
            abort_socket(sock)
    return result


async def _socket_to_stream(
    stream: MuxStream,
    sock: trio.abc.Stream,
    initial: bytes,
    result: Pumped,
    fail: Callable[[str], None],
    what: str,
) -> None:
    try:
        if initial:
            await stream.send_data(initial)
            result.into_stream += len(initial)
        while True:
            try:
                data = await sock.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                fail(f"{what} connection failed: {exc.__cause__ or exc or type(exc).__name__}")
                return
            if not data:
                break
            await stream.send_data(data)
            result.into_stream += len(data)
        await stream.send_end()  # the TCP peer half-closed: so does the stream
    except StreamReset as exc:
        fail(str(exc))


async def _stream_to_socket(
    stream: MuxStream,
    sock: trio.abc.Stream,
    result: Pumped,
    fail: Callable[[str], None],
    what: str,
    scope: trio.CancelScope,
) -> None:
    try:
        while data := await stream.receive_data(READ_SIZE):
            await sock.send_all(data)
            result.out_of_stream += len(data)
    except StreamReset as exc:
        fail(str(exc))
        return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        fail(f"{what} connection failed: {exc.__cause__ or exc or type(exc).__name__}")
        return
    if isinstance(sock, trio.abc.HalfCloseableStream):
        # END_STREAM arrived: pass it on as a FIN; the other direction goes on until its own end.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await sock.send_eof()
        return
    # A TLS connection cannot be half-closed: the session ends here, in both directions (the caller's
    # MuxStream.close() then resets whatever of our direction is still open).
    scope.cancel()
