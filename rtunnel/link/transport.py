"""WebSocket transport: with wslink.py, the only code that touches the WebSocket library (the sans-IO core of
`websockets` >= 17, driven by our own trio code; not websockets.trio, not websockets.asyncio).

Everything else in rtunnel imports this module: `Transport` (an established link, in wslink.py: send/receive
whole binary messages, close, abort), `connect()` for the agent and `serve()` for the relay (the handshakes,
here), and the exceptions.

Why our own I/O loop over `websockets.client.ClientProtocol` / `websockets.server.ServerProtocol`: its C
`apply_mask` masks at GB/s where wsproto's pure-Python XOR capped agent -> relay traffic (response bodies) at
~150-180 MB/s per process, and owning the socket gives us what trio-websocket needed a stream guard for:
- `abort()` closes the socket synchronously (no Close frame that would wait behind a stuck send);
- a send cancelled partway would leave half a frame on the wire, so it closes the link;
- handshake and TLS failures are reported as what they are, never as a timeout.
No compression, no library keepalive (the mux has its own heartbeat).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http
import math
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Final, NoReturn

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHeader, InvalidStatus, NegotiationError
from websockets.frames import Frame
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI

from ..net.clientaddr import OncePer, ProxyHeaderGate
from ..net.limits import AuthThrottle, Counter
from .wslink import (
    _LIBRARY_LOG,
    _RECEIVE_SIZE,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    MAX_MESSAGE_SIZE,
    SUBPROTOCOL,
    TextMessage,
    Transport,
    TransportClosed,
    _describe_os_error,
    _describe_stream_error,
    _peer,
    _peer_address,
    _SocketOrTLS,
    logger,
)

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_NORMAL",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_UNSUPPORTED_DATA",
    "LISTENER_HEADER",
    "MAX_MESSAGE_SIZE",
    "SUBPROTOCOL",
    "AuthRejected",
    "ConnectError",
    "NotARelay",
    "Refusal",
    "TextMessage",
    "Transport",
    "TransportClosed",
    "VersionMismatch",
    "connect",
    "parse_relay_url",
    "serve",
]

# On every refusal of an upgrade by serve() (SPEC.md section 2): a dialer that gets a response without it
# reached something other than an rtunnel relay's agents listener.
LISTENER_HEADER: Final = "Rtunnel-Listener"


class ConnectError(Exception):
    """The WebSocket could not be established; str() is a one-line human reason."""


class AuthRejected(ConnectError):
    """The relay answered 401/403: retrying at full speed will not help."""


class NotARelay(ConnectError):
    """The server answered the upgrade but is no rtunnel acceptor (no Rtunnel-Listener header)."""


class VersionMismatch(ConnectError):
    """The relay did not select rtunnel.v1 (426, or no/another subprotocol)."""


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What serve()'s `authorize` returns to refuse an upgrade: an HTTP status and a one-line text."""

    status: int
    text: str


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
    if response.headers.get(LISTENER_HEADER) == "http":
        return NotARelay(
            f"{target} is a relay's HTTP listener (--http, where clients connect), not its agents listener: "
            "dial the address of `rtunnel serve --agents` instead"
        )
    # Without the header (SPEC.md section 2): not a relay, unless it is a refusal a relay that predates the
    # header would give (401/403: the token; 426: another version).
    if status not in (401, 403, 426) and response.headers.get(LISTENER_HEADER) != "agents":
        return NotARelay(
            f"{target} is not an rtunnel relay's agents listener (it answered {detail}); is it the relay's "
            "--http port? Agents dial the address of `rtunnel serve --agents`"
        )
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


# Handshakes in progress from one address on the agents' listener. An agent makes one connection per relay at a
# time, and a whole fleet behind one NAT reconnecting at once after a relay restart is spread by its backoff;
# 64 at once leaves room for that while a flood from one address gets closed without costing a TLS handshake.
MAX_HANDSHAKES_PER_IP = 64


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
    proxy_protocol: bool = False,
    max_handshakes_per_ip: int | None = MAX_HANDSHAKES_PER_IP,
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
    proxy_protocol: every connection starts with a PROXY protocol header (before TLS) naming the client,
    whose address then stands for the peer's everywhere (logs, throttle, limits); without one within
    handshake_timeout it is closed. max_handshakes_per_ip: handshakes in progress from one client address,
    beyond which its new connections are closed at once (a flood of failing agents from one address must
    not make the relay slow for the others).
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
        handler,
        authenticate,
        handshake_timeout,
        close_timeout,
        max_message_size,
        auth_throttle,
        authorize,
        ProxyHeaderGate("agents listener", handshake_timeout) if proxy_protocol else None,
        Counter(per_key=max_handshakes_per_ip),
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
    proxy_header: ProxyHeaderGate | None = None
    handshakes: Counter = dataclasses.field(default_factory=Counter)
    refusals: OncePer = dataclasses.field(default_factory=OncePer)

    async def serve_connection(self, stream: _SocketOrTLS) -> None:
        # Nothing but cancellation may escape: serve_listeners would take the whole server
        # down. (trio closes the stream with aclose_forcefully when we return.)
        remote = _peer(stream)
        try:
            who = await self._who(stream)
            if who is None:
                return
            remote, address = who
            if self.handshakes.acquire(address) is not None:
                log_now, _ = self.refusals.should_log(address, trio.current_time())
                if log_now:
                    logger.warning(
                        "too many agent handshakes in progress from %s: closing its new connections at once",
                        address,
                    )
                return
            try:
                transport = await self._accept(stream, remote, address)
            finally:
                self.handshakes.release(address)
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

    async def _who(self, stream: _SocketOrTLS) -> tuple[str, str] | None:
        """The client's "host:port" for logs and its address for limits: the peer's, or with the PROXY
        protocol the one its header names (None: no valid header, the connection is to be closed)."""
        remote, address = _peer(stream), _peer_address(stream)
        if self.proxy_header is None:
            return remote, address
        tcp = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        header = await self.proxy_header.accept(tcp.socket, address)  # before any TLS byte
        if header is None:
            return None
        client = header.client_address
        if client is None or not isinstance(header.source, tuple):
            return remote, address  # a LOCAL health check: the balancer speaks for itself
        port = header.source[1]
        return (f"[{client}]:{port}" if ":" in client else f"{client}:{port}"), client

    async def _accept(self, stream: _SocketOrTLS, remote: str, address: str) -> Transport | None:
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
                    refusal, principal = self._check(request, proto, address, remote)
                    response = refusal or response
                if response.status_code != 101:
                    response.headers[LISTENER_HEADER] = "agents"  # "a relay refused", not "not a relay"
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
