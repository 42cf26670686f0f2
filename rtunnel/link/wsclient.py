"""The agent's side of the WebSocket handshake: `connect()` dials the relay and yields the established link.

Every way a dial can fail is reported as what it is, in one line (ConnectError and its subclasses): a refused
or timed-out TCP connect, a TLS failure, a refusal of the upgrade (the token, the version), or a server that is
not a relay's agents listener at all (SPEC.md section 2, the Rtunnel-Listener header).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Sequence

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHeader, InvalidStatus, NegotiationError
from websockets.frames import Frame
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI

from .wsframes import HeadEnd
from .wslink import Transport
from .wsterms import (
    CLOSE_PROTOCOL_ERROR,
    LIBRARY_LOG,
    LISTENER_HEADER,
    MAX_MESSAGE_SIZE,
    RECEIVE_SIZE,
    SUBPROTOCOL,
    SocketOrTLS,
    describe_stream_error,
    peer_name,
)


class ConnectError(Exception):
    """The WebSocket could not be established; str() is a one-line human reason."""


class AuthRejected(ConnectError):
    """The relay answered 401/403: retrying at full speed will not help."""


class NotARelay(ConnectError):
    """The server answered the upgrade but is no rtunnel acceptor (no Rtunnel-Listener header)."""


class VersionMismatch(ConnectError):
    """The relay did not select rtunnel.v1 (426, or no/another subprotocol)."""


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
    dial = _Dial.checked(url, token, ssl_context, close_timeout, max_message_size, tuple(extra_headers))
    phase = ["TCP connect"]  # what we were doing when the deadline hit
    transport: Transport | None = None
    with trio.move_on_after(connect_timeout):
        transport = await dial.run(phase)
    if transport is None:
        raise ConnectError(
            f"cannot connect to relay {dial.target}: timed out after {connect_timeout:g} s ({phase[0]})"
        )
    async with transport.running():
        yield transport


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

    @classmethod
    def checked(
        cls,
        url: str,
        token: str | None,
        ssl_context: ssl.SSLContext | None,
        close_timeout: float,
        max_message_size: int,
        extra_headers: tuple[tuple[str, str], ...],
    ) -> _Dial:
        """The dial connect() was asked for; ValueError (one line) for a bad URL, token or context."""
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
        return cls(
            host, port, path, target, token, ssl_context, close_timeout, max_message_size, extra_headers
        )

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
        stream: SocketOrTLS = tcp
        if self.ssl_context is not None:
            phase[0] = "TLS handshake"
            stream = trio.SSLStream(tcp, self.ssl_context, server_hostname=self.host, https_compatible=True)
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                raise self._error(describe_stream_error(exc)) from exc
        phase[0] = "WebSocket handshake"
        resource, _, query = self.path.partition("?")
        uri = WebSocketURI(self.ssl_context is not None, self.host, self.port, resource, query)
        proto = ClientProtocol(
            uri, subprotocols=[Subprotocol(SUBPROTOCOL)], max_size=self.max_message_size, logger=LIBRARY_LOG
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
            head_end: HeadEnd | None = HeadEnd()
            behind: bytes | bytearray = b""
            while not events:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    proto.receive_eof()
                elif head_end is None:
                    proto.receive_data(data)  # a refusal's body
                else:
                    head, rest = head_end.split(data)
                    proto.receive_data(head)
                    if rest is not None:
                        head_end = None
                        events = proto.events_received()
                        if events:
                            behind = rest  # a 101's: the link's first frames
                            break
                        proto.receive_data(rest)  # not a 101: the protocol reads the body
                events = proto.events_received()
                if not events and not data:
                    why = "peer closed the TCP connection"
                    raise self._error(f"connection closed during the WebSocket handshake ({why})")
                if not events and proto.handshake_exc is not None:
                    bad = proto.handshake_exc
                    why = f"{bad} ({bad.__cause__})" if bad.__cause__ else str(bad)
                    raise self._error(f"WebSocket handshake failed: {why}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = describe_stream_error(exc)
            raise self._error(f"connection closed during the WebSocket handshake ({reason})") from exc
        response = events.pop(0)
        assert isinstance(response, Response)
        if proto.handshake_exc is not None:
            raise self._refusal(proto.handshake_exc, response)
        transport = Transport(stream, proto, peer_name(stream), self.close_timeout, behind=behind)
        if proto.subprotocol != SUBPROTOCOL:
            await transport.aclose(CLOSE_PROTOCOL_ERROR, f"{SUBPROTOCOL} not selected")
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
