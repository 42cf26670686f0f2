"""An in-memory message transport pair for runtime tests: the same contract as rtunnel.link.transport.Transport
(send/receive whole messages, TransportClosed at the end), without sockets."""

from __future__ import annotations

import trio

from rtunnel.link.transport import TransportClosed


class MemoryTransport:
    def __init__(
        self, send: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        self._send = send
        self._receive = receive
        self.messages_sent = 0
        self.blackholed = False

    async def send(self, message: bytes | bytearray | memoryview) -> None:
        if self.blackholed:
            await trio.sleep_forever()
        try:
            await self._send.send(bytes(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportClosed("peer went away") from None
        self.messages_sent += 1

    async def receive(self) -> bytes:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            raise TransportClosed("peer closed") from None

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await self._send.aclose()
        await self._receive.aclose()

    def abort(self) -> None:
        self._send.close()
        self._receive.close()


def memory_transport_pair(buffer: int = 4) -> tuple[MemoryTransport, MemoryTransport]:
    a_send, b_receive = trio.open_memory_channel[bytes](buffer)
    b_send, a_receive = trio.open_memory_channel[bytes](buffer)
    return MemoryTransport(a_send, a_receive), MemoryTransport(b_send, b_receive)
