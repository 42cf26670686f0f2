"""WebSocket transport: the only module that touches the WebSocket library (the sans-IO core of
`websockets` >= 17, driven by our own trio code; not websockets.trio, not websockets.asyncio).

Everything else in rtunnel sees `Transport` (send/receive whole binary messages, close, abort),
`connect()` for the agent and `serve()` for the relay, and the exceptions defined here.

Why our own I/O loop over `websockets.client.ClientProtocol` / `websockets.server.ServerProtocol`
(see /work/shared/notes/libraries.md, section 2): its C `apply_mask` masks at GB/s where wsproto's
pure-Python XOR capped agent -> relay traffic (response bodies) at ~150-180 MB/s per process, and
owning the socket gives us what trio-websocket needed a stream guard for:
- `abort()` closes the socket synchronously (no Close frame that would wait behind a stuck send);
- a send cancelled partway would leave half a frame on the wire, so it closes the link;
- handshake and TLS failures are reported as what they are, never as a timeout.

I/O design (one link = one socket):
- Reading: `receive()` itself is the reader (no reader task, no queue hop): it reads 64 KiB at a
  time under a read lock, feeds the protocol and hands out whole binary messages. The mux has one
  task looping on receive() that never blocks on anything else, so pings and Close frames are seen.
- Writing: `send()` takes the send lock, builds the frame and writes it with a single send_all
  (see Transport._frame for why we frame data ourselves). Control frames the reader produces (pong, Close reply) go to a small buffer that
  the next sender writes in front of its frame, or that one writer task per link writes under the
  same lock. So the reader never waits for the socket: with both ends writing and neither reading,
  waiting there would deadlock the link. Our mux pings at its own protocol level; WebSocket pings
  only come from third-party peers, and a peer that pings faster than we can write loses the link.
- No compression, no library keepalive (the mux has its own heartbeat).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http
import logging
import math
import os
import ssl
import struct
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import NoReturn

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHeader, InvalidStatus, NegotiationError
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Side, State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI

from .limits import AuthThrottle

try:
    from websockets.speedups import apply_mask
except ImportError:  # no C extension for this platform: still correct, ~100x slower masking
    from websockets.utils import apply_mask

__all__ = [
    "MAX_MESSAGE_SIZE",
    "SUBPROTOCOL",
    "AuthRejected",
    "ConnectError",
    "Refusal",
    "Transport",
    "TransportClosed",
    "VersionMismatch",
    "connect",
    "parse_relay_url",
    "serve",
]

SUBPROTOCOL = "rtunnel.v1"

# The protocol allows frames up to 16 MiB - 1 plus a 9-byte header; the slack leaves room for a
# few small frames coalesced with the largest one. Senders must not coalesce beyond this.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024 + 64 * 1024

# One read per 64 KiB: smaller reads multiply the per-call cost (trio checkpoint + syscall).
_RECEIVE_SIZE = 65536

# Control frames (pongs) not yet written because a send is stuck. Each is at most 131 bytes; a
# peer that keeps pinging while not reading what we send is broken or hostile.
_MAX_PENDING_CONTROL = 64 * 1024

# Masking works on pieces of this size, written into a buffer kept per link (see Transport._frame).
_MASK_CHUNK = 64 * 1024
_KEEP_FRAME_BUFFER = 1024 * 1024 + 14

logger = logging.getLogger("rtunnel.transport")

_SocketOrTLS = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class _LibraryLog(logging.LoggerAdapter[logging.Logger]):
    """The logger handed to websockets. It logs every request header (our token) at DEBUG and
    each open/close at INFO; only its warnings and errors get through."""

    def isEnabledFor(self, level: int) -> bool:
        return level >= logging.WARNING and self.logger.isEnabledFor(level)


_LIBRARY_LOG = _LibraryLog(logging.getLogger("rtunnel.transport.websockets"), {})


class TransportClosed(Exception):
    """The link is gone (peer closed, TCP lost, closed or aborted locally)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectError(Exception):
    """The WebSocket could not be established; str() is a one-line human reason."""


class AuthRejected(ConnectError):
    """The relay answered 401/403: retrying at full speed will not help."""


class VersionMismatch(ConnectError):
    """The relay did not select rtunnel.v1 (426, or no/another subprotocol)."""


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What serve()'s `authorize` returns to refuse an upgrade: an HTTP status and a one-line text."""

    status: int
    text: str


def _describe_stream_error(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {cause.reason or cause}"
    if isinstance(cause, OSError):
        return cause.strerror or str(cause)
    if isinstance(exc, trio.ClosedResourceError):
        return "closed locally"
    return str(exc) or type(exc).__name__


def _describe_os_error(exc: OSError) -> str:
    """One line for a connect failure; trio's open_tcp_stream hides per-address errors in a group."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc.__cause__, ExceptionGroup):
        parts: list[str] = []
        for sub in exc.__cause__.exceptions:
            text = _describe_os_error(sub) if isinstance(sub, OSError) else str(sub)
            if text not in parts:
                parts.append(text)
        return "; ".join(parts)
    return exc.strerror or str(exc)


def _describe_close(close: Close) -> str:
    try:
        name = CloseCode(close.code).name
    except ValueError:
        name = "PRIVATE" if 4000 <= close.code < 5000 else "UNKNOWN"
    text = f"WebSocket closed: {close.code} {name}"
    return f"{text} ({close.reason})" if close.reason else text


def _peer(stream: _SocketOrTLS) -> str:
    sock = (stream.transport_stream if isinstance(stream, trio.SSLStream) else stream).socket
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_address(stream: _SocketOrTLS) -> str:
    """The peer's IP address alone (the unit of per-address limits)."""
    sock = (stream.transport_stream if isinstance(stream, trio.SSLStream) else stream).socket
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


# --------------------------------------------------------------------------------------------
# Transport


async def _acquire(lock: trio.Lock | trio.StrictFIFOLock) -> None:
    """Take a lock; when it is free, without a scheduler pass. The socket call that follows is
    the checkpoint, so a small message costs one pass instead of two (~6 us each)."""
    try:
        lock.acquire_nowait()  # fails while others wait too, so FIFO order holds
    except trio.WouldBlock:
        await lock.acquire()


class Transport:
    """One established WebSocket carrying binary messages. Built by connect() and serve()."""

    def __init__(
        self, stream: _SocketOrTLS, proto: ClientProtocol | ServerProtocol, remote: str, close_timeout: float
    ) -> None:
        self.remote = remote  # "host:port" of the peer, for logs
        # What the server's authenticate() returned for this link (e.g. the token group), None on clients.
        self.principal: object = None
        self._stream = stream
        self._socket = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        self._proto = proto
        self._close_timeout = close_timeout
        self._send_lock = trio.StrictFIFOLock()
        self._read_lock = trio.Lock()
        self._messages: collections.deque[bytes] = collections.deque()
        self._fragments: list[bytes | bytearray | memoryview] | None = None  # a fragmented message
        self._control = bytearray()  # pongs / Close replies from the reader, not yet written
        self._frame_buffer = bytearray()  # for masking large messages (clients only)
        self._control_ready = trio.Event()
        self._text = False  # the peer sent a text message (a protocol violation for us)
        self._eof = False  # the peer closed its direction of the TCP connection
        self._error: str | None = None  # first socket failure
        self._end: str | None = None  # how the WebSocket ended, if the peer (or its data) ended it
        self._local_reason: str | None = None  # set once we close or abort
        self._aborted = False

    @property
    def closed(self) -> bool:
        """True once the link is unusable (closed, aborted, or its socket failed)."""
        return self._local_reason is not None or self._end is not None or self._error is not None

    async def send(self, message: bytes | bytearray | memoryview) -> None:
        """Send one binary message. Blocks until the kernel took it (backpressure).

        Cancelling a send that already started writing kills the link (the frame is cut)."""
        if self.closed:
            await trio.lowlevel.checkpoint()
            raise TransportClosed(self._reason())
        await trio.lowlevel.checkpoint_if_cancelled()  # before we own the lock, nothing is cut
        await _acquire(self._send_lock)
        try:
            proto = self._proto
            if self.closed or proto.state is not State.OPEN:
                raise TransportClosed(self._reason())
            data = self._frame(message)
            if self._control:
                data = b"".join((self._control, data))
                self._control.clear()
            if not await self._send_all(data):
                raise TransportClosed(self._reason())
        finally:
            self._send_lock.release()

    async def receive(self) -> bytes:
        """Next binary message (cancel-safe). Raises TransportClosed when the link is gone."""
        while True:
            if self._local_reason is not None:
                await trio.lowlevel.checkpoint()
                raise TransportClosed(self._local_reason)
            if self._messages:
                # Already parsed from an earlier read: still a checkpoint, as trio expects.
                await trio.lowlevel.checkpoint()
                if self._messages and self._local_reason is None:
                    return self._messages.popleft()
                continue
            if self._text:
                reason = "peer sent a text message (rtunnel.v1 uses binary messages only)"
                await self._close(1003, "binary messages only", reason)
                raise TransportClosed(reason)
            if self.closed:
                await trio.lowlevel.checkpoint()
                raise TransportClosed(self._reason())
            await _acquire(self._read_lock)
            try:
                if not (self._messages or self._text or self.closed):
                    await self._read()
            finally:
                self._read_lock.release()

    async def aclose(self) -> None:
        """Graceful close (Close handshake), bounded by close_timeout; idempotent."""
        await self._close(1000, "", "closed locally")

    def abort(self) -> None:
        """Close the socket now, without a Close frame (which could wait behind a stuck send)."""
        if self._local_reason is None:
            self._local_reason = "aborted locally"
        self._aborted = True
        self._close_now("aborted locally")

    def __repr__(self) -> str:
        return f"<Transport remote={self.remote} closed={self.closed}>"

    def _frame(self, message: bytes | bytearray | memoryview) -> bytes | memoryview:
        """One final binary frame. Built here, not by the protocol object (whose state does not
        change for a data frame): its serializer makes two payload-sized allocations, and above
        glibc's 128 KiB mmap threshold each one faults its pages in again (0.8 s/GB measured for
        256 KiB messages; masking 64 KiB pieces into a kept buffer: 0.08 s/GB)."""
        size = len(message)
        if size < 126:
            head = struct.pack("!BB", 0x82, size)
        elif size < 65536:
            head = struct.pack("!BBH", 0x82, 126, size)
        else:
            head = struct.pack("!BBQ", 0x82, 127, size)
        if self._proto.side is Side.SERVER:
            return b"".join((head, message))
        mask = os.urandom(4)  # a client masks every frame (RFC 6455 5.3)
        head = bytes([head[0], head[1] | 0x80]) + head[2:] + mask
        if size <= _MASK_CHUNK:
            return b"".join((head, apply_mask(message, mask)))
        total = len(head) + size
        buf = self._frame_buffer
        if len(buf) < total:
            buf = bytearray(total)  # never resized in place: a view of the old one may live on
            if total <= _KEEP_FRAME_BUFFER:
                self._frame_buffer = buf
        buf[: len(head)] = head
        view = memoryview(message)
        offset = len(head)
        for start in range(0, size, _MASK_CHUNK):  # multiples of 4: the mask phase is kept
            piece = apply_mask(view[start : start + _MASK_CHUNK], mask)
            buf[offset + start : offset + start + len(piece)] = piece
        return memoryview(buf)[:total]

    # -- socket --------------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason

    def _close_now(self, reason: str) -> None:
        """Close the socket without any I/O; blocked senders and receivers wake with an error."""
        self._fail(reason)
        self._socket.socket.close()

    def _reason(self) -> str:
        if self._local_reason is not None:
            return self._local_reason
        if self._end is not None:
            return self._end
        return f"connection lost: {self._error or 'no WebSocket close'}"

    async def _send_all(self, data: bytes | memoryview) -> bool:
        """Write with the send lock held; False (reason recorded) if the socket failed."""
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(_describe_stream_error(exc))
            return False
        except BaseException:
            # Cancelled (or worse) partway through a frame: the peer's parser would wait forever
            # for the rest of it, so the link cannot be used again.
            self._close_now("a send was interrupted partway")
            raise
        return True

    async def _read(self) -> None:
        """One read from the socket into the protocol (read lock held)."""
        try:
            data = await self._stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(_describe_stream_error(exc))
            return
        proto = self._proto
        if data:
            proto.receive_data(data)
        else:
            self._eof = True
            self._fail("peer closed the TCP connection")
            proto.receive_eof()
        self._handle(proto.events_received())

    # -- protocol events -------------------------------------------------------------------------

    def _handle(self, events: Sequence[Request | Response | Frame]) -> None:
        """Turn parsed frames into messages and queue what the protocol wants written."""
        messages = self._messages
        for frame in events:
            assert isinstance(frame, Frame)  # the handshake is over
            opcode = frame.opcode
            if opcode is Opcode.BINARY:
                if self._text:
                    continue  # the link is being closed; nothing after the text message counts
                if frame.fin:
                    data = frame.data
                    messages.append(data if type(data) is bytes else bytes(data))
                else:
                    self._fragments = [frame.data]
            elif opcode is Opcode.CONT:
                if self._fragments is not None:  # else: continuing a text message
                    self._fragments.append(frame.data)
                    if frame.fin:
                        if not self._text:
                            messages.append(b"".join(self._fragments))
                        self._fragments = None
            elif opcode is Opcode.TEXT:
                self._text = True
            elif opcode is Opcode.CLOSE and self._end is None and self._proto.close_rcvd is not None:
                self._end = _describe_close(self._proto.close_rcvd)
            # PING: the protocol queued the Pong already (written below); PONG: nothing to do.
        proto = self._proto
        if self._end is None and proto.parser_exc is not None and not isinstance(proto.parser_exc, EOFError):
            # Protocol violation or message over max_size: the protocol sent Close (1002/1009).
            sent = proto.close_sent
            self._end = _describe_close(sent) if sent is not None else f"protocol error: {proto.parser_exc}"
        writes = proto.data_to_send()
        if writes:
            for chunk in writes:
                # SEND_EOF (b"") asks us to close the TCP connection: aclose() does that.
                self._control += chunk
            if len(self._control) > _MAX_PENDING_CONTROL:
                self._close_now("peer sent control frames faster than we could write them")
            elif self._control:
                self._control_ready.set()

    async def _write_control(self) -> None:
        """Background task (one per link): write what the reader queued, so it never waits."""
        while True:
            await self._control_ready.wait()
            self._control_ready = trio.Event()
            async with self._send_lock:
                if self._control and self._error is None:
                    data = bytes(self._control)
                    self._control.clear()
                    if not await self._send_all(data):
                        return

    # -- closing ---------------------------------------------------------------------------------

    async def _close(self, code: int, ws_reason: str, local_reason: str) -> None:
        if self._local_reason is None:
            self._local_reason = local_reason
        try:
            if not self._aborted and self._error is None:
                with trio.move_on_after(self._close_timeout):
                    await self._close_handshake(code, ws_reason)
        finally:
            self._close_now(self._error or "closed locally")

    async def _close_handshake(self, code: int, ws_reason: str) -> None:
        proto = self._proto
        async with self._send_lock:
            if proto.state is State.OPEN:
                proto.send_close(code, ws_reason)
            self._control += b"".join(proto.data_to_send())
            if self._control and self._error is None:
                data = bytes(self._control)
                self._control.clear()
                if not await self._send_all(data):
                    return
        # Wait for the peer's Close. A server then closes the TCP connection at once; a client
        # waits for the server to do so (RFC 6455 7.1.1), so the TIME_WAIT lands on the server.
        async with self._read_lock:
            while not self._eof and self._error is None:
                if proto.close_rcvd is not None and (
                    proto.side is Side.SERVER or proto.state is State.CLOSED
                ):
                    return
                await self._read()


# --------------------------------------------------------------------------------------------
# client side (agent)


def parse_relay_url(url: str) -> tuple[str, str, int, str]:
    """Validate a relay URL; return (scheme, host, port, path). Raises ValueError (one line)."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise ValueError(f"relay URL must start with ws:// or wss://: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"relay URL must not contain credentials (use a token): {url!r}")
    if parts.fragment:
        raise ValueError(f"relay URL must not contain a fragment: {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"relay URL has no host: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"relay URL has an invalid port: {url!r}") from None
    if port is None:
        port = 443 if scheme == "wss" else 80
    elif port == 0:
        raise ValueError(f"relay URL has an invalid port: {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if not (path.isascii() and path.isprintable()) or " " in path:
        raise ValueError(f"relay URL path must be printable ASCII without spaces: {url!r}")
    return scheme, host, port, path


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    connect_timeout: float = 10,
    close_timeout: float = 5,
    max_message_size: int = MAX_MESSAGE_SIZE,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[Transport]:
    """Dial the relay and yield the Transport. Leaving the block normally closes it gracefully
    (bounded by close_timeout); leaving it with an exception (or cancelled) aborts it.

    extra_headers: added to the upgrade request (e.g. the tunnel the agent serves).

    ssl_context: for wss:// (None = system CAs); must be None for ws://.
    Raises ValueError for a bad URL/token/context, ConnectError (or a subclass) when the link
    cannot be established; errors raised inside the block come out unchanged."""
    scheme, host, port, path = parse_relay_url(url)
    if scheme == "ws" and ssl_context is not None:
        raise ValueError("an SSL context was given for a ws:// relay URL (use wss://)")
    if token is not None and not (token.isascii() and token.isprintable() and token.strip()):
        raise ValueError("token must be non-empty printable ASCII")
    if token is not None and token != token.strip():
        raise ValueError("token must not start or end with whitespace")
    if scheme == "wss" and ssl_context is None:
        ssl_context = ssl.create_default_context()
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    dial = _Dial(
        host, port, path, target, token, ssl_context, close_timeout, max_message_size, tuple(extra_headers)
    )

    phase = ["TCP connect"]  # what we were doing when the deadline hit
    transport: Transport | None = None
    with trio.move_on_after(connect_timeout):
        transport = await dial.run(phase)
    if transport is None:
        raise ConnectError(
            f"cannot connect to relay {target}: timed out after {connect_timeout:g} s ({phase[0]})"
        )
    body_exc: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:  # hosts the link's control-frame writer
            nursery.start_soon(transport._write_control)
            try:
                yield transport
            except BaseException as exc:
                body_exc = exc
                # Failed or cancelled: the link may be stuck, and a Close would wait behind it.
                transport.abort()
                raise
            finally:
                await transport.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps the block's exception in a group; give the caller the plain one.
        others = [e for e in group.exceptions if e is not body_exc]
        if body_exc is not None and all(isinstance(e, trio.Cancelled) for e in others):
            _reraise(body_exc)
        raise
    finally:
        transport.abort()  # no-op after aclose(); releases the socket on any other exit


@dataclasses.dataclass(frozen=True)
class _Dial:
    host: str
    port: int
    path: str
    target: str  # "host:port" for messages
    token: str | None
    ssl_context: ssl.SSLContext | None
    close_timeout: float
    max_message_size: int
    extra_headers: tuple[tuple[str, str], ...] = ()

    async def run(self, phase: list[str]) -> Transport:
        try:
            tcp = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:
            raise self._error(_describe_os_error(exc)) from exc
        try:
            return await self._upgrade(tcp, phase)
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise

    def _error(self, reason: str) -> ConnectError:
        return ConnectError(f"cannot connect to relay {self.target}: {reason}")

    async def _upgrade(self, tcp: trio.SocketStream, phase: list[str]) -> Transport:
        stream: _SocketOrTLS = tcp
        if self.ssl_context is not None:
            phase[0] = "TLS handshake"
            stream = trio.SSLStream(tcp, self.ssl_context, server_hostname=self.host, https_compatible=True)
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                raise self._error(_describe_stream_error(exc)) from exc
        phase[0] = "WebSocket handshake"
        resource, _, query = self.path.partition("?")
        uri = WebSocketURI(self.ssl_context is not None, self.host, self.port, resource, query)
        proto = ClientProtocol(
            uri, subprotocols=[Subprotocol(SUBPROTOCOL)], max_size=self.max_message_size, logger=_LIBRARY_LOG
        )
        request = proto.connect()
        if self.token is not None:
            request.headers["Authorization"] = "Bearer " + self.token
        for name, value in self.extra_headers:
            request.headers[name] = value
        proto.send_request(request)
        try:
            await stream.send_all(b"".join(proto.data_to_send()))
            events: list[Request | Response | Frame] = []
            while not events:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if data:
                    proto.receive_data(data)
                else:
                    proto.receive_eof()
                events = proto.events_received()
                if not events and not data:
                    why = "peer closed the TCP connection"
                    raise self._error(f"connection closed during the WebSocket handshake ({why})")
                if not events and proto.handshake_exc is not None:
                    bad = proto.handshake_exc
                    why = f"{bad} ({bad.__cause__})" if bad.__cause__ else str(bad)
                    raise self._error(f"WebSocket handshake failed: {why}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = _describe_stream_error(exc)
            raise self._error(f"connection closed during the WebSocket handshake ({reason})") from exc
        response = events.pop(0)
        assert isinstance(response, Response)
        if proto.handshake_exc is not None:
            raise self._refusal(proto.handshake_exc, response)
        transport = Transport(stream, proto, _peer(stream), self.close_timeout)
        transport._handle(events)  # frames that arrived right behind the 101
        if proto.subprotocol != SUBPROTOCOL:
            await transport._close(1002, f"{SUBPROTOCOL} not selected", "version mismatch")
            raise VersionMismatch(
                f"relay {self.target} did not select subprotocol {SUBPROTOCOL} (selected: none)"
            )
        return transport

    def _refusal(self, exc: Exception, response: Response) -> ConnectError:
        err: ConnectError
        if isinstance(exc, InvalidStatus):
            err = _rejection(response, self.target, self.token)
        elif isinstance(exc, NegotiationError | InvalidHeader) and "subprotocol" in str(exc).lower():
            err = VersionMismatch(f"relay {self.target} did not select subprotocol {SUBPROTOCOL} ({exc})")
        else:
            err = ConnectError(f"WebSocket handshake with relay {self.target} failed: {exc}")
        err.__cause__ = exc
        return err


def _rejection(response: Response, target: str, token: str | None) -> ConnectError:
    status = response.status_code
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "unknown status"
    body = (response.body or b"").decode("utf-8", "replace").strip().splitlines()
    detail = f"{status} {phrase}"
    if body and body[0].strip():
        detail += ": " + "".join(c if c.isprintable() else "?" for c in body[0].strip()[:200])
    if status in (401, 403):
        hint = "no token was given" if token is None else "check the token"
        return AuthRejected(f"relay {target} refused the connection ({detail}); {hint}")
    if status == 426:
        return VersionMismatch(f"relay {target} does not speak {SUBPROTOCOL} ({detail})")
    return ConnectError(f"relay {target} refused the WebSocket upgrade ({detail})")


def _reraise(exc: BaseException) -> NoReturn:
    """Raise exc without chaining it to the group that is being handled (which contains it)."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


# --------------------------------------------------------------------------------------------
# server side (relay)


def _bearer_token(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The raw token of the one Authorization: Bearer header, or None (missing, repeated, other
    scheme). Names must be lower case."""
    values = [v for k, v in headers if k == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token or None


def _select_subprotocol(proto: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    # Never refuse here: the token is checked first (401), then the subprotocol (426).
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in offered else None


async def serve(
    handler: Callable[[Transport], Awaitable[None]],
    host: str | None,
    port: int,
    *,
    authenticate: Callable[[bytes | None], object],
    ssl_context: ssl.SSLContext | None = None,
    auth_throttle: AuthThrottle | None = None,
    authorize: Callable[[object, Sequence[tuple[bytes, bytes]]], object] | None = None,
    handshake_timeout: float = 10,
    close_timeout: float = 5,
    max_message_size: int = MAX_MESSAGE_SIZE,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept WebSockets until cancelled; run handler(transport) for each authenticated one.

    task_status.started((host, port)) reports the first bound address (port 0 allowed).
    authenticate gets the raw Bearer token (None when missing/not Bearer/repeated) and must
    compare in constant time; a falsy result refuses the agent (401), anything else accepts it and
    becomes `transport.principal`. auth_throttle: failed attempts per source address, beyond
    which the address is refused with 429 for a while (checked before the token).
    authorize (optional) then gets that principal and the upgrade request's headers (names in lower
    case) and returns the link's principal, or a Refusal to answer instead (a 401 counts as a failed
    authentication).
    The transport is closed gracefully when the handler returns; if the handler raises, the
    exception is logged (never fatal) and the transport aborted."""
    tcp_listeners = await trio.open_tcp_listeners(port, host=host)
    bound_host, bound_port = tcp_listeners[0].socket.getsockname()[:2]
    listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]
    if ssl_context is None:
        listeners = tcp_listeners
    else:
        listeners = [trio.SSLListener(tcp, ssl_context, https_compatible=True) for tcp in tcp_listeners]

    acceptor = _Acceptor(
        handler, authenticate, handshake_timeout, close_timeout, max_message_size, auth_throttle, authorize
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, acceptor.serve_connection, listeners)
        task_status.started((bound_host, bound_port))


@dataclasses.dataclass(frozen=True)
class _Acceptor:
    handler: Callable[[Transport], Awaitable[None]]
    authenticate: Callable[[bytes | None], object]
    handshake_timeout: float
    close_timeout: float
    max_message_size: int
    auth_throttle: AuthThrottle | None = None
    authorize: Callable[[object, Sequence[tuple[bytes, bytes]]], object] | None = None

    async def serve_connection(self, stream: _SocketOrTLS) -> None:
        # Nothing but cancellation may escape: serve_listeners would take the whole server
        # down. (trio closes the stream with aclose_forcefully when we return.)
        remote = _peer(stream)
        try:
            transport = await self._accept(stream, remote)
            if transport is None:
                return
            async with trio.open_nursery() as nursery:  # hosts the link's control-frame writer
                nursery.start_soon(transport._write_control)
                try:
                    await self.handler(transport)
                except Exception:
                    transport.abort()
                    logger.exception("handler for %s failed", remote)
                finally:
                    await transport.aclose()
                    nursery.cancel_scope.cancel()
        except* Exception:
            logger.exception("connection from %s failed", remote)

    async def _accept(self, stream: _SocketOrTLS, remote: str) -> Transport | None:
        proto = ServerProtocol(
            select_subprotocol=_select_subprotocol, max_size=self.max_message_size, logger=_LIBRARY_LOG
        )
        with trio.move_on_after(self.handshake_timeout):
            try:
                received = await self._read_request(stream, proto, remote)
                if received is None:
                    return None
                request, events = received
                response = proto.accept(request)
                principal: object = None
                if response.status_code != 101:
                    logger.info(
                        "handshake from %s failed: %s (%d)", remote, proto.handshake_exc, response.status_code
                    )
                else:
                    refusal, principal = self._check(request, proto, _peer_address(stream), remote)
                    response = refusal or response
                proto.send_response(response)
                await stream.send_all(b"".join(proto.data_to_send()))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                logger.info("handshake from %s failed: %s", remote, _describe_stream_error(exc))
                return None
            if response.status_code != 101:
                return None
            transport = Transport(stream, proto, remote, self.close_timeout)
            transport.principal = principal
            transport._handle(events)  # frames the client sent right behind its request
            return transport
        logger.info("handshake from %s timed out after %g s", remote, self.handshake_timeout)
        return None

    async def _read_request(
        self, stream: _SocketOrTLS, proto: ServerProtocol, remote: str
    ) -> tuple[Request, list[Request | Response | Frame]] | None:
        while True:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                logger.info("handshake from %s failed: peer closed the TCP connection", remote)
                return None
            proto.receive_data(data)
            events = proto.events_received()
            if events:
                request = events.pop(0)
                assert isinstance(request, Request)
                return request, events
            if proto.handshake_exc is not None:
                # Not HTTP, or a head over the library's limits. It answers 414/431 itself.
                reply = b"".join(proto.data_to_send())
                if not reply:
                    reply = proto.reject(400, "bad WebSocket handshake request\n").serialize()
                await stream.send_all(reply)
                logger.info("handshake from %s failed: %s", remote, proto.handshake_exc)
                return None

    def _check(
        self, request: Request, proto: ServerProtocol, address: str, remote: str
    ) -> tuple[Response | None, object]:
        """(refusal, principal) for a well-formed upgrade: 429 for an address that failed too
        often (not even checked), 401 for the token, then 426 for the version."""
        throttle = self.auth_throttle
        wait = throttle.retry_after(address, trio.current_time()) if throttle else None
        if wait is not None:
            # Blocked after too many failures (logged once, by the throttle).
            text = "too many failed authentications from your address; try again later\n"
            response = proto.reject(429, text)
            response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return response, None
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.raw_items()]
        principal = self.authenticate(_bearer_token(headers))
        if principal and self.authorize is not None:
            principal = self.authorize(principal, headers)
            if isinstance(principal, Refusal) and principal.status != 401:
                logger.warning("rejected %s: %s (%d)", remote, principal.text, principal.status)
                return proto.reject(principal.status, principal.text + "\n"), None
        if not principal or isinstance(principal, Refusal):
            if throttle is not None:
                throttle.failed(address, trio.current_time())
            logger.warning("rejected %s: missing or wrong token (401)", remote)
            response = proto.reject(401, "missing or wrong token\n")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response, None
        if proto.subprotocol != SUBPROTOCOL:
            offered = request.headers.get_all("Sec-WebSocket-Protocol")
            logger.warning("rejected %s: %s not offered (%r) (426)", remote, SUBPROTOCOL, offered)
            response = proto.reject(426, f"this relay supports subprotocol {SUBPROTOCOL} only\n")
            response.headers["Upgrade"] = "websocket"
            return response, None
        return None, principal
