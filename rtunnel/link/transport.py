"""WebSocket transport: with wslink.py, wsframes.py, wsclient.py and wsserver.py, the only code that touches the WebSocket library (the sans-IO core of
`websockets` >= 17, driven by our own trio code; not websockets.trio, not websockets.asyncio).

Everything else in rtunnel imports this module: `Transport` (an established link, in wslink.py: send/receive
whole binary messages, close, abort), `connect()` for the agent (wsclient.py) and `serve()` for the relay
(wsserver.py), and the exceptions.

Why our own I/O loop over `websockets.client.ClientProtocol` / `websockets.server.ServerProtocol`: its C
`apply_mask` masks at GB/s where wsproto's pure-Python XOR capped agent -> relay traffic (response bodies) at
~150-180 MB/s per process, and owning the socket gives us what trio-websocket needed a stream guard for:
- `abort()` closes the socket synchronously (no Close frame that would wait behind a stuck send);
- a send cancelled partway would leave half a frame on the wire, so it closes the link;
- handshake and TLS failures are reported as what they are, never as a timeout.
No compression, no library keepalive (the mux has its own heartbeat).
"""

from __future__ import annotations

from .wsclient import AuthRejected, ConnectError, NotARelay, VersionMismatch, connect, parse_relay_url
from .wslink import Transport
from .wsserver import Refusal, serve
from .wsterms import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    LISTENER_HEADER,
    MAX_MESSAGE_SIZE,
    SUBPROTOCOL,
    TextMessage,
    TransportClosed,
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
