"""FROZEN COPY, for bench/transport_bench.py only: rtunnel/transport.py as it was on trio-websocket
0.12.2 (wsproto), before the move to the websockets sans-IO core. Not part of the package; do not
fix or extend it (its tests were tests/rtunnel/test_transport.py at that time).

WebSocket transport: the only module that touches the WebSocket library (trio-websocket 0.12.2).

Everything else in rtunnel sees `Transport` (send/receive whole binary messages, close, abort),
`connect()` for the agent and `serve()` for the relay, and the exceptions defined here, so the
library can be swapped (websockets.trio, or a sans-IO core) by rewriting this file alone.

Why this is more than a thin wrapper (see /work/shared/notes/libraries.md, section 1):
- We own the TCP/TLS stream and hand trio-websocket a `_GuardedStream` around it. That lets us
  close the socket synchronously (`abort()` must not send a Close on a stuck link), record why
  the link died, and notice a failure during the handshake: trio-websocket's handshake waits on
  an event that is never set when the socket fails first, so a TLS error or an EOF would
  otherwise look like a timeout.
- A send cancelled partway corrupts the stream, so the guard closes the socket when that happens.
- An exception escaping a serve_websocket handler crashes the whole server, so we run our own
  listeners and catch everything per connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http
import logging
import math
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import NoReturn, TypeVar

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
    wrap_server_stream,
)

from .limits import AuthThrottle

__all__ = [
    "MAX_MESSAGE_SIZE",
    "SUBPROTOCOL",
    "AuthRejected",
    "ConnectError",
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

# trio-websocket's reader stops reading the socket when this queue is full; one consumer task
# drains it without blocking (mux rule), so the library default of 1 is enough and bounds memory.
_MESSAGE_QUEUE_SIZE = 1

logger = logging.getLogger("rtunnel.transport")

_T = TypeVar("_T")
_SocketOrTLS = trio.SocketStream | trio.SSLStream[trio.SocketStream]


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


# --------------------------------------------------------------------------------------------
# stream guard


class _GuardedStream(trio.abc.Stream):
    """The TCP/TLS stream that trio-websocket drives, with failure tracking and a sync close."""

    def __init__(self, stream: _SocketOrTLS) -> None:
        self._stream = stream
        self._socket = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        self.error: str | None = None  # first failure seen, for messages
        self.failed = trio.Event()

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self.failed.set()

    def close_now(self, reason: str) -> None:
        """Close the socket without any I/O; blocked senders and receivers wake with an error."""
        self.fail(reason)
        self._socket.socket.close()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.fail(_describe_stream_error(exc))
            raise
        except BaseException:
            # Cancelled (or worse) partway through a frame: the peer's parser would wait forever
            # for the rest of it, so the link cannot be used again.
            self.close_now("a send was interrupted partway")
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.fail(_describe_stream_error(exc))
            raise
        if not data:
            self.fail("peer closed the TCP connection")
        return data

    async def aclose(self) -> None:
        self.fail("closed locally")
        await self._stream.aclose()


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


async def _race(guard: _GuardedStream, step: Callable[[], Awaitable[_T]]) -> _T | None:
    """Run a handshake step until it finishes or the stream fails (then return None)."""
    result: list[_T] = []

    async def run(cancel_scope: trio.CancelScope) -> None:
        result.append(await step())
        cancel_scope.cancel()

    async def watch(cancel_scope: trio.CancelScope) -> None:
        await guard.failed.wait()
        cancel_scope.cancel()

    async with trio.open_nursery() as race:
        race.start_soon(run, race.cancel_scope)
        race.start_soon(watch, race.cancel_scope)
    return result[0] if result else None


# --------------------------------------------------------------------------------------------
# Transport


class Transport:
    """One established WebSocket carrying binary messages. Built by connect() and serve()."""

    def __init__(
        self, ws: WebSocketConnection, guard: _GuardedStream, remote: str, close_timeout: float
    ) -> None:
        self.remote = remote  # "host:port" of the peer, for logs
        # What the server's authenticate() returned for this link (e.g. the token group), None on clients.
        self.principal: object = None
        self._ws = ws
        self._guard = guard
        self._close_timeout = close_timeout
        self._local_reason: str | None = None  # set once we close or abort
        self._aborted = False

    @property
    def closed(self) -> bool:
        """True once the link is unusable (closed, aborted, or its socket failed)."""
        return self._local_reason is not None or self._ws.closed is not None or self._guard.failed.is_set()

    async def send(self, message: bytes | bytearray | memoryview) -> None:
        """Send one binary message. Blocks until the kernel took it (backpressure).

        Cancelling a send that already started writing kills the link (the frame is cut)."""
        # trio-websocket insists on bytes; this is the only copy we make of the payload.
        data = message if type(message) is bytes else bytes(message)
        if self._local_reason is not None:
            await trio.lowlevel.checkpoint()
            raise TransportClosed(self._local_reason)
        try:
            await self._ws.send_message(data)
        except ConnectionClosed as exc:
            raise TransportClosed(self._reason(exc)) from None

    async def receive(self) -> bytes:
        """Next binary message (cancel-safe). Raises TransportClosed when the link is gone."""
        if self._local_reason is not None:
            await trio.lowlevel.checkpoint()
            raise TransportClosed(self._local_reason)
        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise TransportClosed(self._reason(exc)) from None
        if isinstance(message, str):
            reason = "peer sent a text message (rtunnel.v1 uses binary messages only)"
            await self._close(1003, "binary messages only", reason)
            raise TransportClosed(reason)
        return message

    async def aclose(self) -> None:
        """Graceful close (Close handshake), bounded by close_timeout; idempotent."""
        await self._close(1000, None, "closed locally")

    def abort(self) -> None:
        """Close the socket now, without a Close frame (which could wait behind a stuck send)."""
        if self._local_reason is None:
            self._local_reason = "aborted locally"
        self._aborted = True
        self._guard.close_now("aborted locally")

    async def _close(self, code: int, ws_reason: str | None, local_reason: str) -> None:
        if self._local_reason is None:
            self._local_reason = local_reason
        try:
            if not self._aborted:
                with trio.move_on_after(self._close_timeout):
                    await self._ws.aclose(code, ws_reason)
        finally:
            # ws.aclose() returns at once without closing the socket when the WebSocket was
            # already closed (peer close, TCP loss), so always make sure the fd is released.
            self._guard.close_now(self._guard.error or "closed locally")

    def _reason(self, exc: ConnectionClosed) -> str:
        if self._local_reason is not None:
            return self._local_reason
        close = exc.reason
        if close is None or close.code == 1006:
            return f"connection lost: {self._guard.error or 'no WebSocket close'}"
        text = f"WebSocket closed: {close.code} {close.name}"
        return f"{text} ({close.reason})" if close.reason else text

    def __repr__(self) -> str:
        return f"<Transport remote={self.remote} closed={self.closed}>"


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
) -> AsyncIterator[Transport]:
    """Dial the relay and yield the Transport. Leaving the block normally closes it gracefully
    (bounded by close_timeout); leaving it with an exception (or cancelled) aborts it.

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
    dial = _Dial(host, port, path, target, token, ssl_context, close_timeout, max_message_size)

    transport: Transport | None = None
    body_exc: BaseException | None = None
    try:
        # This nursery hosts trio-websocket's reader task for the life of the connection.
        async with trio.open_nursery() as nursery:
            phase = ["TCP connect"]  # what we were doing when the deadline hit
            with trio.move_on_after(connect_timeout):
                transport = await dial.run(nursery, phase)
            if transport is None:
                timeout = f"timed out after {connect_timeout:g} s ({phase[0]})"
                raise ConnectError(f"cannot connect to relay {target}: {timeout}")
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
        # The nursery wraps everything in a group; give the caller plain exceptions back.
        if transport is None:
            _reraise(_handshake_failure(group, target, token) or group)
        _reraise(_body_failure(group, body_exc) or group)


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

    async def run(self, nursery: trio.Nursery, phase: list[str]) -> Transport:
        try:
            tcp = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:
            raise self._error(_describe_os_error(exc)) from exc
        try:
            return await self._upgrade(nursery, tcp, phase)
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise

    def _error(self, reason: str) -> ConnectError:
        return ConnectError(f"cannot connect to relay {self.target}: {reason}")

    async def _upgrade(self, nursery: trio.Nursery, tcp: trio.SocketStream, phase: list[str]) -> Transport:
        stream: _SocketOrTLS = tcp
        if self.ssl_context is not None:
            phase[0] = "TLS handshake"
            stream = trio.SSLStream(tcp, self.ssl_context, server_hostname=self.host, https_compatible=True)
            # Explicit, so that a TLS failure is reported as such (see _race for the reason).
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                raise self._error(_describe_stream_error(exc)) from exc
        phase[0] = "WebSocket handshake"
        guard = _GuardedStream(stream)
        host_header = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != (443 if self.ssl_context is not None else 80):
            host_header += f":{self.port}"
        headers = []
        if self.token is not None:
            headers.append((b"Authorization", b"Bearer " + self.token.encode()))
        ws = await _race(
            guard,
            partial(
                wrap_client_stream,
                nursery,
                guard,  # type: ignore[arg-type]  # annotated as Socket/SSLStream; any Stream works
                host_header,
                self.path,
                subprotocols=[SUBPROTOCOL],
                extra_headers=headers,
                message_queue_size=_MESSAGE_QUEUE_SIZE,
                max_message_size=self.max_message_size,
                receive_buffer_size=None,  # let trio read 64 KiB at a time
            ),
        )
        if ws is None:
            reason = f"connection closed during the WebSocket handshake ({guard.error})"
            raise self._error(reason)
        transport = Transport(ws, guard, _peer(stream), self.close_timeout)
        if ws.subprotocol != SUBPROTOCOL:
            await transport._close(1002, f"{SUBPROTOCOL} not selected", "version mismatch")
            selected = ws.subprotocol or "none"
            raise VersionMismatch(
                f"relay {self.target} did not select subprotocol {SUBPROTOCOL} (selected: {selected})"
            )
        return transport


def _handshake_failure(
    group: BaseExceptionGroup[BaseException], target: str, token: str | None
) -> BaseException | None:
    """Map what the connect nursery raised before the Transport existed to a ConnectError."""
    errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    if not errors or any(not isinstance(e, Exception) for e in errors):
        return None  # cancellation or KeyboardInterrupt: let it through untouched
    for exc in errors:
        if isinstance(exc, ConnectionRejected):
            return _rejection(exc, target, token)
    for exc in errors:
        if isinstance(exc, ConnectError):
            return exc
    exc = errors[0]
    reason = f"{type(exc).__name__}: {exc}"
    err = ConnectError(f"WebSocket handshake with relay {target} failed: {reason}")
    err.__cause__ = exc
    return err


def _rejection(exc: ConnectionRejected, target: str, token: str | None) -> ConnectError:
    status = exc.status_code
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "unknown status"
    body = (exc.body or b"").decode("utf-8", "replace").strip().splitlines()
    detail = f"{status} {phrase}"
    if body and body[0].strip():
        detail += ": " + "".join(c if c.isprintable() else "?" for c in body[0].strip()[:200])
    err: ConnectError
    if status in (401, 403):
        hint = "no token was given" if token is None else "check the token"
        err = AuthRejected(f"relay {target} refused the connection ({detail}); {hint}")
    elif status == 426:
        err = VersionMismatch(f"relay {target} does not speak {SUBPROTOCOL} ({detail})")
    else:
        err = ConnectError(f"relay {target} refused the WebSocket upgrade ({detail})")
    err.__cause__ = exc
    return err


def _body_failure(
    group: BaseExceptionGroup[BaseException], body_exc: BaseException | None
) -> BaseException | None:
    """Pick what to raise after the block ran: the block's own exception if that is all there
    is, a TransportClosed if the library's reader task failed, else None (raise the group)."""
    others = [e for e in group.exceptions if e is not body_exc]
    if all(isinstance(e, trio.Cancelled) for e in others):
        return body_exc  # None if only the reader's Cancelled is in there
    errors = [e for e in others if not isinstance(e, trio.Cancelled)]
    if (
        (body_exc is None or isinstance(body_exc, trio.Cancelled))
        and len(errors) == 1
        and isinstance(errors[0], Exception)
    ):
        err = TransportClosed(f"WebSocket library failed: {errors[0]!r}")
        err.__cause__ = errors[0]
        return err
    return None


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
    scheme). Names from trio-websocket are already lower case."""
    values = [v for k, v in headers if k == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token or None


async def serve(
    handler: Callable[[Transport], Awaitable[None]],
    host: str | None,
    port: int,
    *,
    authenticate: Callable[[bytes | None], object],
    ssl_context: ssl.SSLContext | None = None,
    auth_throttle: AuthThrottle | None = None,
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
        handler, authenticate, handshake_timeout, close_timeout, max_message_size, auth_throttle
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

    async def serve_connection(self, stream: _SocketOrTLS) -> None:
        # Nothing but cancellation may escape: serve_listeners would take the whole server
        # down. (trio closes the stream with aclose_forcefully when we return.)
        remote = _peer(stream)
        try:
            async with trio.open_nursery() as nursery:  # hosts trio-websocket's reader task
                transport = await self._accept(nursery, stream, remote)
                if transport is not None:
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

    async def _accept(self, nursery: trio.Nursery, stream: _SocketOrTLS, remote: str) -> Transport | None:
        guard = _GuardedStream(stream)
        with trio.move_on_after(self.handshake_timeout):
            request = await _race(
                guard,
                partial(
                    wrap_server_stream,
                    nursery,
                    guard,
                    message_queue_size=_MESSAGE_QUEUE_SIZE,
                    max_message_size=self.max_message_size,
                    receive_buffer_size=None,
                ),
            )
            if request is None:
                logger.info("handshake from %s failed: %s", remote, guard.error)
                return None
            try:
                address = _peer_address(stream)
                throttle = self.auth_throttle
                wait = throttle.retry_after(address, trio.current_time()) if throttle else None
                if wait is not None:
                    # Blocked after too many failures: not even checked (logged once, by the throttle).
                    await request.reject(
                        429,
                        extra_headers=[(b"Retry-After", b"%d" % max(1, math.ceil(wait))), _TEXT_PLAIN],
                        body=b"too many failed authentications from your address; try again later\n",
                    )
                    return None
                principal = self.authenticate(_bearer_token(request.headers))
                if not principal:
                    if throttle is not None:
                        throttle.failed(address, trio.current_time())
                    logger.warning("rejected %s: missing or wrong token (401)", remote)
                    await request.reject(
                        401,
                        extra_headers=[(b"WWW-Authenticate", b"Bearer"), _TEXT_PLAIN],
                        body=b"missing or wrong token\n",
                    )
                    return None
                offered = request.proposed_subprotocols
                if SUBPROTOCOL not in offered:
                    logger.warning("rejected %s: %s not offered (%r) (426)", remote, SUBPROTOCOL, offered)
                    body = f"this relay supports subprotocol {SUBPROTOCOL} only\n".encode()
                    await request.reject(426, extra_headers=[_TEXT_PLAIN], body=body)
                    return None
                ws = await request.accept(subprotocol=SUBPROTOCOL)
            except ConnectionClosed:
                logger.info("handshake from %s failed: %s", remote, guard.error)
                return None
            transport = Transport(ws, guard, remote, self.close_timeout)
            transport.principal = principal
            return transport
        logger.info("handshake from %s timed out after %g s", remote, self.handshake_timeout)
        return None


_TEXT_PLAIN = (b"Content-Type", b"text/plain")
