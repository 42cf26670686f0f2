"""Replay (relay only): send a captured request again, as a new exchange through the relay's own HTTP
listener, so that it takes the whole path a client's request takes (routing, limits, retries, the agent's
allowlist) and is captured like any other, linked to the original by its request id.

What is sent is what was captured: values that were redacted were never kept, so headers that carried one
are left out, and a redacted query parameter or JSON field goes out redacted.
"""

from __future__ import annotations

from collections.abc import Callable

import h11
import trio

from .inspector import Capture
from .logs import REQUEST_ID_HEADER
from .redact import REDACTED

__all__ = ["REPLAY_TIMEOUT", "ReplayClient"]

REPLAY_TIMEOUT = 120.0
# Framing and connection handling are ours to choose for the new request.
_DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"x-request-id",
    }
)


class ReplayClient:
    """Sends captures to the relay's HTTP listener, at the address `address()` gives once the listener is up
    (a wildcard bind is reached on loopback)."""

    def __init__(self, address: Callable[[], tuple[str, int] | None]) -> None:
        self.address = address

    async def __call__(self, capture: Capture, request_id: str) -> None:
        address = self.address()
        if address is None:
            raise RuntimeError("the relay's HTTP listener is not up")
        host, port = address
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        body = bytes(capture.request.data)
        headers = [
            (name, value)
            for name, value in capture.request_headers
            if name.lower() not in _DROPPED and value != REDACTED.encode()
        ]
        if not any(name.lower() == b"host" for name, _ in headers):
            headers.insert(0, (b"Host", f"{host}:{port}".encode()))
        headers += [
            (b"Content-Length", str(len(body)).encode()),
            (REQUEST_ID_HEADER, request_id.encode()),
            (b"Connection", b"close"),
        ]
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method=capture.method, target=capture.target.encode("latin-1"), headers=headers)
        with trio.fail_after(REPLAY_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                out = conn.send(request) or b""
                if body:
                    out += conn.send(h11.Data(data=body)) or b""
                out += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(out)
                # Read the response to its end (and drop it): the relay's capture of it is what counts.
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        return
