"""The ASGI `websocket` scope: the agent speaks WebSocket to the client through the tunnel stream.

After the relay forwards an upgrade request (SPEC 5.5) and the agent answers 101, the stream carries the
client's raw WebSocket bytes. The protocol is `websockets`' sans-IO ServerProtocol, the core the transport
already uses for the agent's own link (one WebSocket implementation in the project, its C masking, and its
handshake checks); this module feeds it the stream's bytes, turns its frames into ASGI events for the app and
the app's messages into frames. The handshake is checked before the app is called (a bad one gets the 400
ServerProtocol chooses); the 101 goes out when the app sends `websocket.accept`, a `websocket.close` before
that is a 403, as ASGI asks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import trio
from websockets.datastructures import Headers
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from protocol import ErrorCode, ResponseHead

from ...http.bridge import READ_SIZE
from ...http.proxyheaders import response_headers_for_client
from ...link.mux import StreamReset
from .handler import (
    AppRequest,
    ClientDisconnected,
    Exchange,
    HeadTimer,
    fail,
    send_head,
    timed_out,
)

if TYPE_CHECKING:
    from .asgi import AsgiService

__all__ = ["MAX_MESSAGE", "WebSocketCall"]

log = logging.getLogger("rtunnel.agent.app")
ws_log = logging.getLogger("rtunnel.agent.app.websocket")

MAX_MESSAGE: Final = 16 * 1024 * 1024  # a client's message beyond this closes the connection with 1009
# After the app returns or closes, how long the client has to finish the closing handshake.
CLOSE_TIMEOUT: Final = 10.0
# Client messages the app has not received yet; beyond it the stream is not read (flow control holds the
# client).
QUEUED_MESSAGES: Final = 16

Message = dict[str, Any]


class WebSocketCall:
    def __init__(self, service: AsgiService, exchange: Exchange, request: AppRequest) -> None:
        self.service = service
        self.exchange = exchange
        self.request = request
        self.scope = trio.CancelScope()
        self.timer = HeadTimer(service.response_timeout)
        self.protocol = ServerProtocol(max_size=MAX_MESSAGE, logger=ws_log)
        self.write_lock = trio.StrictFIFOLock()  # the app's sends and the reader's replies (pong, close)
        self.incoming_send, self.incoming = trio.open_memory_channel[Message](QUEUED_MESSAGES)
        self.connected = False  # websocket.connect delivered
        self.accepted = False
        self.closed = False  # the app sent websocket.close, or the session is over
        self.disconnected = trio.Event()
        self.close_code = 1006
        self.ended = False  # our direction of the stream has ended
        self._fragments: list[bytes] = []
        self._fragment_opcode: Opcode | None = None

    def disconnect(self) -> None:
        self.closed = True
        self.disconnected.set()

    async def run(self) -> None:
        request = self.request
        headers = Headers([(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers])
        target = request.raw_path + (b"?" + request.query if request.query else b"")
        # ServerProtocol parses the handshake itself before any frame: give it the request as it came.
        self.protocol.receive_data(Request(target.decode("latin-1"), headers).serialize())
        parsed = [event for event in self.protocol.events_received() if isinstance(event, Request)]
        handshake = self.protocol.accept(parsed[0]) if parsed else self.protocol.reject(400, "bad request\n")
        if handshake.status_code != 101:
            body = handshake.body or b""
            self.exchange.note = "bad websocket handshake"
            await send_head(
                self.exchange, handshake.status_code, _raw(handshake.headers), end_stream=not body
            )
            if body:
                await self.exchange.stream.send_data(body, end_stream=True)
                self.exchange.finished = True
            return
        self.handshake = handshake
        from .asgi import base_scope

        scope = base_scope(self.service, request, "websocket")
        scope["subprotocols"] = [
            item.strip()
            for name, value in request.headers
            if name.lower() == b"sec-websocket-protocol"
            for item in value.decode("latin-1").split(",")
            if item.strip()
        ]
        scope["extensions"] = {}
        what = f"websocket {request.raw_path.decode('latin-1')}"
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                try:
                    with self.timer.scope:
                        await self.service.app(scope, self.receive, self.send)
                except Exception as exc:
                    if not (isinstance(exc, ClientDisconnected) and self.disconnected.is_set()):
                        log.error("%s: the ASGI app raised", what, exc_info=exc)
                        await self._failed(repr(exc))
                    return
                await self._returned(what)
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self.disconnected.wait()
                nursery.cancel_scope.cancel()
        finally:
            if not self.ended and self.accepted:
                self.exchange.reset(ErrorCode.CANCEL)

    async def _returned(self, what: str) -> None:
        if self.timer.expired and not self.accepted and not self.closed:
            await timed_out(self.exchange, self.timer.timeout)
        elif not self.accepted and not self.closed:
            log.error("%s: the ASGI app returned without accepting or closing the WebSocket", what)
            await fail(self.exchange, "returned without a handshake", head_sent=False)
        elif self.accepted and not self.closed:
            await self._send_close(1000, "")

    async def _failed(self, what: str) -> None:
        if self.accepted:
            self.exchange.note = f"app failed: {what}"
            if not self.closed:
                await self._send_close(1011, "")
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self.disconnected.wait()
        else:
            await fail(self.exchange, what, head_sent=False)

    # -- the app's receive and send ---------------------------------------------------------------------

    async def receive(self) -> Message:
        if not self.connected:
            self.connected = True
            return {"type": "websocket.connect"}
        if not self.accepted:
            raise RuntimeError("websocket receive() before websocket.accept")
        try:
            return await self.incoming.receive()
        except trio.EndOfChannel:
            return {"type": "websocket.disconnect", "code": self.close_code}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.closed and kind in ("websocket.send", "websocket.close"):
            raise ClientDisconnected("the WebSocket is closed")
        try:
            if kind == "websocket.accept":
                await self._accept(message)
            elif kind == "websocket.send":
                if not self.accepted:
                    raise RuntimeError("websocket.send before websocket.accept")
                if message.get("bytes") is not None:
                    self.protocol.send_binary(bytes(message["bytes"]))
                else:
                    self.protocol.send_text(str(message.get("text", "")).encode("utf-8"))
                await self._flush()
            elif kind == "websocket.close":
                if self.accepted:
                    await self._send_close(int(message.get("code", 1000)), str(message.get("reason") or ""))
                else:
                    self.closed = True
                    self.timer.head_sent()
                    self.exchange.note = "websocket refused"
                    await self.exchange.reply_error(
                        403, "rtunnel agent: the application refused the WebSocket\n"
                    )
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} in a websocket scope")
        except (StreamReset, InvalidState) as exc:
            self.disconnect()
            raise ClientDisconnected(f"the client went away: {exc}") from None

    async def _accept(self, message: Message) -> None:
        if self.accepted or self.closed:
            raise RuntimeError("websocket.accept sent twice, or after websocket.close")
        response = self.handshake
        subprotocol = message.get("subprotocol")
        if subprotocol is not None:
            response.headers["Sec-WebSocket-Protocol"] = str(subprotocol)
        for name, value in message.get("headers", ()):
            response.headers[bytes(name).decode("latin-1")] = bytes(value).decode("latin-1")
        self.protocol.send_response(response)
        self.protocol.data_to_send()  # the 101 in HTTP/1.1 bytes: the relay writes it from the REPLY below
        self.timer.head_sent()
        headers = response_headers_for_client(_raw(response.headers), keep_upgrade=True)
        await self.exchange.stream.send_reply(ResponseHead(101, b"Switching Protocols", tuple(headers)))
        self.exchange.status = 101
        self.exchange.note = "websocket"
        self.accepted = True
        self.nursery.start_soon(self._read)

    async def _send_close(self, code: int, reason: str) -> None:
        self.closed = True
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
        await self._flush()

    # -- the client's side ------------------------------------------------------------------------------

    async def _read(self) -> None:
        stream = self.exchange.stream
        try:
            while True:
                try:
                    data = await stream.receive_data(READ_SIZE)
                except StreamReset:
                    return
                if data:
                    self.protocol.receive_data(data)
                else:
                    self.protocol.receive_eof()
                for event in self.protocol.events_received():
                    if isinstance(event, Frame):
                        await self._deliver(event)
                await self._flush()  # pongs, the reply to a close
                if not data or self.protocol.state is State.CLOSED:
                    return
        finally:
            closing = self.protocol.close_rcvd or self.protocol.close_sent
            if closing is not None:
                self.close_code = closing.code
            self.incoming_send.close()
            self.disconnect()

    async def _deliver(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self._fragment_opcode = frame.opcode
            self._fragments = [bytes(frame.data)]
        elif frame.opcode is Opcode.CONT:
            self._fragments.append(bytes(frame.data))
        else:
            return  # ping, pong, close: ServerProtocol answers them itself
        if not frame.fin:
            return
        data = b"".join(self._fragments)
        self._fragments = []
        if self._fragment_opcode is Opcode.TEXT:
            message: Message = {"type": "websocket.receive", "text": data.decode("utf-8", "replace")}
        else:
            message = {"type": "websocket.receive", "bytes": data}
        await self.incoming_send.send(message)

    async def _flush(self) -> None:
        async with self.write_lock:
            for chunk in self.protocol.data_to_send():
                if self.ended:
                    continue
                if chunk:
                    await self.exchange.stream.send_data(chunk)
                else:  # ServerProtocol ends its side after the closing handshake
                    await self.exchange.stream.send_end()
                    self.ended = True
                    self.exchange.finished = True


def _raw(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.raw_items()]
