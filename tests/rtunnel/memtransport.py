"""An in-memory message transport pair for runtime tests: the same contract as
rtunnel.link.transport.Transport (send/receive whole messages, TransportClosed at the end), without sockets; and
a relay and an agent multiplexer connected over it.

Like a Transport on plain TCP it offers send_nowait (the mux then writes from the stream's own task while the
link is idle): a message that does not fit the channel's buffer is held and written by flush, as a socket's
unwritten tail is. `DIRECT = False` (or direct=False) makes a pair without it, like a TLS link."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import trio

from protocol import Role
from rtunnel.link.mux import Multiplexer, MuxStream
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


class MuxPair(NamedTuple):
    relay: Multiplexer
    agent: Multiplexer
    relay_transport: MemoryTransport
    agent_transport: MemoryTransport


def mux_pair(
    handler: Callable[[MuxStream], Awaitable[None]] | None = None,
    *,
    relay_options: Mapping[str, Any] | None = None,
    agent_options: Mapping[str, Any] | None = None,
    **both: Any,
) -> MuxPair:
    """A relay (ACCEPTOR) and an agent (DIALER, serving streams with `handler`) multiplexer, not running yet.
    Keyword arguments go to both; `relay_options`/`agent_options` to one end (and win over `both`)."""
    t_relay, t_agent = memory_transport_pair()
    relay = Multiplexer(t_relay, Role.ACCEPTOR, **{**both, **(relay_options or {})})
    agent = Multiplexer(t_agent, Role.DIALER, handler=handler, **{**both, **(agent_options or {})})
    return MuxPair(relay, agent, t_relay, t_agent)


async def start_pair(
    nursery: trio.Nursery, handler: Callable[[MuxStream], Awaitable[None]] | None = None, **options: Any
) -> MuxPair:
    """mux_pair(handler, **options), both ends running in `nursery`; returns once the relay end has started."""
    pair = mux_pair(handler, **options)
    nursery.start_soon(pair.agent.run)
    await nursery.start(pair.relay.run)
    return pair


@asynccontextmanager
async def running_pair(
    handler: Callable[[MuxStream], Awaitable[None]] | None = None, **options: Any
) -> AsyncIterator[MuxPair]:
    """start_pair in a nursery of its own; both ends are aborted when the block ends."""
    async with trio.open_nursery() as nursery:
        pair = await start_pair(nursery, handler, **options)
        try:
            yield pair
        finally:
            pair.relay.abort("test over")
            pair.agent.abort("test over")
            nursery.cancel_scope.cancel()
