"""What the WebSocket modules share (wslink.py, the link; wsclient.py and wsserver.py, its handshakes): the
subprotocol and size limits, the close codes, the exceptions, and how a failure or a peer is named in logs."""

from __future__ import annotations

import logging
import ssl
from typing import Final

import trio
from websockets.frames import Close, CloseCode

SUBPROTOCOL = "rtunnel.v1"

# On every refusal of an upgrade by serve() (SPEC.md section 2): a dialer that gets a response without it
# reached something other than an rtunnel relay's agents listener.
LISTENER_HEADER: Final = "Rtunnel-Listener"

# The protocol allows frames up to 16 MiB - 1 plus a 9-byte header; the slack leaves room for a
# few small frames coalesced with the largest one. Senders must not coalesce beyond this.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024 + 64 * 1024

# One read per 64 KiB: smaller reads multiply the per-call cost (trio checkpoint + syscall).
RECEIVE_SIZE = 65536

logger = logging.getLogger("rtunnel.transport")

SocketOrTLS = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class _LibraryLog(logging.LoggerAdapter[logging.Logger]):
    """The logger handed to websockets. It logs every request header (our token) at DEBUG and
    each open/close at INFO; only its warnings and errors get through."""

    def isEnabledFor(self, level: int) -> bool:
        return level >= logging.WARNING and self.logger.isEnabledFor(level)


LIBRARY_LOG = _LibraryLog(logging.getLogger("rtunnel.transport.websockets"), {})


class TransportClosed(Exception):
    """The link is gone (peer closed, TCP lost, closed or aborted locally)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TextMessage(TransportClosed):
    """The peer sent a text message: a connection error PROTOCOL_ERROR (SPEC 2). The link is left open so
    that the caller can send its GOAWAY first; closing it then sends Close 1003."""


# WebSocket close codes (SPEC 2): which one ends a connection, by how it ended.
CLOSE_NORMAL = 1000  # a drain completed, or a plain close
CLOSE_GOING_AWAY = 1001  # the endpoint is shutting down
CLOSE_PROTOCOL_ERROR = 1002  # after a GOAWAY reporting a connection error
CLOSE_UNSUPPORTED_DATA = 1003  # after a text message
CLOSE_POLICY_VIOLATION = 1008  # after a GOAWAY with ENHANCE_YOUR_CALM


def describe_stream_error(exc: BaseException) -> str:
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


def describe_close(close: Close) -> str:
    try:
        name = CloseCode(close.code).name
    except ValueError:
        name = "PRIVATE" if 4000 <= close.code < 5000 else "UNKNOWN"
    text = f"WebSocket closed: {close.code} {name}"
    return f"{text} ({close.reason})" if close.reason else text


def peer_name(stream: SocketOrTLS) -> str:
    """The peer's "host:port" (for logs)."""
    sock = (stream.transport_stream if isinstance(stream, trio.SSLStream) else stream).socket
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
