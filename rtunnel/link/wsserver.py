"""The relay's side of the WebSocket handshake: `serve()` accepts agents' links and runs a handler for each.

Before a link is handed over: the PROXY header (when configured), a bound on handshakes in progress per address,
the failed-authentication throttle (429), the token (401), the caller's own checks (`authorize`), then the
subprotocol (426). Every refusal carries the Rtunnel-Listener header (SPEC.md section 2).
"""

from __future__ import annotations

import dataclasses
import math
import ssl
from collections.abc import Awaitable, Callable, Sequence

import trio
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from ..net.clientaddr import OncePer, ProxyHeaderGate
from ..net.limits import AuthThrottle, Counter
from .wsframes import HeadEnd
from .wslink import Transport
from .wsterms import (
    LIBRARY_LOG,
    LISTENER_HEADER,
    MAX_MESSAGE_SIZE,
    RECEIVE_SIZE,
    SUBPROTOCOL,
    SocketOrTLS,
    describe_stream_error,
    logger,
    peer_name,
)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What serve()'s `authorize` returns to refuse an upgrade: an HTTP status and a one-line text."""

    status: int
    text: str


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

    async def serve_connection(self, stream: SocketOrTLS) -> None:
        # Nothing but cancellation may escape: serve_listeners would take the whole server
        # down. (trio closes the stream with aclose_forcefully when we return.)
        remote = peer_name(stream)
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
            async with transport.running():
                try:
                    await self.handler(transport)
                except Exception:
                    transport.abort()
                    logger.exception("handler for %s failed", remote)
        except* Exception:
            logger.exception("connection from %s failed", remote)

    async def _who(self, stream: SocketOrTLS) -> tuple[str, str] | None:
        """The client's "host:port" for logs and its address for limits: the peer's, or with the PROXY
        protocol the one its header names (None: no valid header, the connection is to be closed)."""
        remote, address = peer_name(stream), _peer_address(stream)
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

    async def _accept(self, stream: SocketOrTLS, remote: str, address: str) -> Transport | None:
        proto = ServerProtocol(
            select_subprotocol=_select_subprotocol, max_size=self.max_message_size, logger=LIBRARY_LOG
        )
        with trio.move_on_after(self.handshake_timeout):
            try:
                received = await self._read_request(stream, proto, remote)
                if received is None:
                    return None
                request, behind = received
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
                logger.info("handshake from %s failed: %s", remote, describe_stream_error(exc))
                return None
            if response.status_code != 101:
                return None
            transport = Transport(stream, proto, remote, self.close_timeout, behind=behind)
            transport.principal = principal
            return transport
        logger.info("handshake from %s timed out after %g s", remote, self.handshake_timeout)
        return None

    async def _read_request(
        self, stream: SocketOrTLS, proto: ServerProtocol, remote: str
    ) -> tuple[Request, bytes | bytearray] | None:
        """The upgrade request, and the bytes read past its head (the link's first frames)."""
        head_end = HeadEnd()
        while True:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                logger.info("handshake from %s failed: peer closed the TCP connection", remote)
                return None
            head, behind = head_end.split(data)
            proto.receive_data(head)
            events = proto.events_received()
            if events:
                request = events.pop(0)
                assert isinstance(request, Request)
                return request, behind or b""
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


def _peer_address(stream: SocketOrTLS) -> str:
    """The peer's IP address alone (the unit of per-address limits)."""
    sock = (stream.transport_stream if isinstance(stream, trio.SSLStream) else stream).socket
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"
