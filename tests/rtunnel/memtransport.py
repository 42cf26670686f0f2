"""An in-memory message transport pair for runtime tests: the same contract as
rtunnel.link.transport.Transport (send/receive whole messages, TransportClosed at the end), without sockets.

Like a Transport on plain TCP it offers send_nowait (the mux then writes from the stream's own task while the
link is idle): a message that does not fit the channel's buffer is held and written by flush, as a socket's
unwritten tail is. `DIRECT = False` (or direct=False) makes a pair without it, like a TLS link."""

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


class DirectMemoryTransport(MemoryTransport):
    def __init__(
        self, send: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        super().__init__(send, receive)
        self._held: bytes | None = None
        self.messages_held = 0  # messages send_nowait could not write at once

    @property
    def can_send_nowait(self) -> bool:
        return self._held is None and not self.blackholed

    def send_nowait(self, message: bytes | bytearray | memoryview) -> None:
        assert self.can_send_nowait
        try:
            self._send.send_nowait(bytes(message))
        except trio.WouldBlock:
            self._held = bytes(message)
            self.messages_held += 1
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._held = bytes(message)  # flush reports it
            return
        self.messages_sent += 1

    @property
    def send_pending(self) -> bool:
        return self._held is not None

    async def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            await MemoryTransport.send(self, held)

    async def send(self, message: bytes | bytearray | memoryview) -> None:
        await self.flush()
        await super().send(message)


DIRECT = True


def memory_transport_pair(
    buffer: int = 4, *, direct: bool | None = None
) -> tuple[MemoryTransport, MemoryTransport]:
    a_send, b_receive = trio.open_memory_channel[bytes](buffer)
    b_send, a_receive = trio.open_memory_channel[bytes](buffer)
    kind = DirectMemoryTransport if (DIRECT if direct is None else direct) else MemoryTransport
    return kind(a_send, a_receive), kind(b_send, b_receive)
