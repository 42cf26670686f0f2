"""An upstream for protocol-switch tests: WebSocket (trio-websocket, server side), a raw-bytes Upgrade protocol
and plain HTTP, all on one port (the agent has a single --upstream).

Each TCP connection's request head is read first, then handed on (replayed) to whichever side it asks for:

=====================================  ==========================================================================
WebSocket ``/ws/echo...``              echoes every message (text as text, binary as binary) until closed
WebSocket ``/ws/close-from-server``    sends ``bye``, then closes with 4000 ``server says bye``
WebSocket ``/ws/abort``                sends ``doomed``, then resets the TCP connection (no Close frame)
WebSocket ``/ws/idle?key=K``           waits for ``state.release(K)``, then sends ``still here``
``Upgrade: x-echo`` (any path)         101, then echoes raw bytes; on EOF it half-closes too (FIN after FIN)
``Upgrade: x-decline``                 200 ``declined``: an upgrade the server turns down, keep-alive goes on
anything else                          200, body ``plain <target>``
=====================================  ==========================================================================

``state.sessions`` records how each WebSocket session ended on the server side: ``(path, code, reason)``.
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import h11
import trio
import trio_websocket

__all__ = ["MAX_MESSAGE", "WsUpstream", "open_ws_upstream"]

MAX_MESSAGE = 17 * 1024 * 1024  # above the 16 MiB messages the tests send
_MAX_HEAD = 64 * 1024


@dataclass
class WsUpstream:
    port: int
    paths: list[str] = field(default_factory=list)  # every request-target, in arrival order
    sessions: list[tuple[str, int | None, str | None]] = field(default_factory=list)
    _releases: dict[str, trio.Event] = field(default_factory=dict)
    _session_ended: trio.Event = field(default_factory=trio.Event)

    def release_event(self, key: str) -> trio.Event:
        return self._releases.setdefault(key, trio.Event())

    def release(self, key: str) -> None:
        self.release_event(key).set()

    def _ended(self, path: str, code: int | None, reason: str | None) -> None:
        self.sessions.append((path, code, reason))
        self._session_ended.set()
        self._session_ended = trio.Event()

    async def wait_sessions(self, count: int) -> None:
        """Until `count` WebSocket sessions have ended on the server side."""
        while len(self.sessions) < count:
            await self._session_ended.wait()


class _Replay(trio.abc.Stream):
    """A stream whose first bytes (the already-read head) are served again before the socket's."""

    def __init__(self, stream: trio.SocketStream, head: bytes) -> None:
        self.stream = stream
        self._head = head

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._head:
            size = len(self._head) if max_bytes is None else max_bytes
            data, self._head = self._head[:size], self._head[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk or len(data) > _MAX_HEAD:
            return b""
        data += chunk
    return data


def _header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().lower()
    return b""


async def _websocket(up: WsUpstream, stream: trio.SocketStream, head: bytes, path: str) -> None:
    async with trio.open_nursery() as nursery:
        request = await trio_websocket.wrap_server_stream(
            nursery, _Replay(stream, head), max_message_size=MAX_MESSAGE, receive_buffer_size=None
        )
        ws = await request.accept()
        code: int | None = None
        reason: str | None = None
        try:
            if path.startswith("/ws/echo"):
                while True:
                    await ws.send_message(await ws.get_message())
            elif path == "/ws/close-from-server":
                await ws.send_message("bye")
                await ws.aclose(code=4000, reason="server says bye")
                code, reason = 4000, "server says bye"
            elif path == "/ws/abort":
                await ws.send_message("doomed")
                with suppress(OSError):
                    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                stream.socket.close()
                code, reason = None, "aborted"
            elif path.startswith("/ws/idle"):
                key = path.partition("key=")[2]
                await up.release_event(key).wait()
                await ws.send_message("still here")
                await ws.get_message()  # until the client closes
        except trio_websocket.ConnectionClosed as exc:
            if exc.reason is not None:
                code, reason = exc.reason.code, exc.reason.reason
        finally:
            up._ended(path, code, reason)
        nursery.cancel_scope.cancel()


async def _raw_echo(stream: trio.SocketStream) -> None:
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-echo\r\nConnection: upgrade\r\n\r\n"
    )
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.send_eof()  # the client's FIN, answered with ours once everything is echoed


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


async def _plain(up: WsUpstream, stream: trio.SocketStream, head: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    first = True
    while isinstance(request := await _next_event(conn, stream), h11.Request):
        while not isinstance(await _next_event(conn, stream), h11.EndOfMessage):
            pass  # bodiless requests only here
        target = request.target.decode("latin-1")
        if not first:
            up.paths.append(target)
        first = False
        declined = any(k == b"upgrade" and v.lower() == b"x-decline" for k, v in request.headers)
        body = b"declined\n" if declined else f"plain {target}\n".encode()
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        if not declined:
            headers.append(("Connection", "close"))  # simple: one request per connection, except below
        data = conn.send(h11.Response(status_code=200, headers=headers)) or b""
        data += (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(data)
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()  # a declined upgrade keeps the connection: the next request follows


async def _handle(up: WsUpstream, stream: trio.SocketStream) -> None:
    try:
        head = await _read_head(stream)
        if not head:
            return
        target = head.split(b" ", 2)[1].decode("latin-1")
        up.paths.append(target)
        upgrade = _header(head, b"upgrade")
        if upgrade == b"websocket":
            await _websocket(up, stream, head, target)
        elif upgrade == b"x-echo":
            await _raw_echo(stream)
        else:
            await _plain(up, stream, head)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
        pass


@asynccontextmanager
async def open_ws_upstream() -> AsyncIterator[WsUpstream]:
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        up = WsUpstream(listeners[0].socket.getsockname()[1])
        nursery.start_soon(trio.serve_listeners, functools.partial(_handle, up), listeners)
        yield up
        nursery.cancel_scope.cancel()
