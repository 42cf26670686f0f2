"""A fault-injecting TCP proxy for resilience tests (trio, in-process).

    async with open_fault_proxy("127.0.0.1", target_port) as proxy:
        url = f"ws://127.0.0.1:{proxy.port}"
        proxy.blackhole(); ...; proxy.pass_()

Commands are synchronous and take effect at once, on current and new connections alike:

- ``pass_()``: back to normal. Resets delay, throttle, pause, blackhole and reject_new.
- ``delay(seconds)``: every chunk is forwarded ``seconds`` after it was read (latency, pipelined: throughput is
  unchanged up to the per-direction buffer of ``QUEUE_CHUNKS`` x 64 KiB). Changing the delay, or ``pass_()``,
  re-times chunks already waiting.
- ``throttle(bytes_per_second)``: each direction of each connection is paced to that rate, written in pieces
  of about ``TICK`` seconds' worth (so a throttled transfer arrives in many small pieces).
- ``pause()``: stop reading and writing, keep everything; ``pass_()`` resumes and nothing is lost. Senders
  see backpressure once the kernel buffers fill (a transient stall that TCP would recover from).
- ``blackhole()``: the current connections die silently: nothing is forwarded in either direction, ever
  again, but their sockets stay open (no FIN, no RST). The proxy stops reading them, so their senders fill
  up and block as on a dead link; bytes already read are dropped. **A blackholed connection stays dead after
  ``pass_()``**: a link that comes back does not revive flows whose endpoints should have given up on them,
  and a tunnel that resumed on a half-lost byte stream would be corrupt. Connections accepted while the
  blackhole lasts are accepted (the client's connect succeeds) and never connected to the target; they are
  dead too. Only connections accepted after ``pass_()`` forward. Dead sockets close when the proxy exits
  or on ``cut()``/``close()``.
- ``cut()``: RST every current connection, both sides (SO_LINGER 0, then close).
- ``close()``: FIN every current connection, both sides (shutdown for writing; whatever the proxy had read
  but not yet written is dropped, so the peer may see a truncated stream followed by a clean EOF). The
  proxy then discards what still arrives until the peer closes (closing with unread data would send RST).
- ``reject_new(True)``: new connections are accepted and reset at once (the client sees ECONNRESET, in its
  connect or its first read, depending on timing); current connections are untouched.
  ``reject_new(False)`` ends it.

Buffers are bounded: 64 KiB reads, at most ``QUEUE_CHUNKS`` chunks queued per direction, and a full queue
stops the reader (backpressure end to end). A connection refused by the target is reset toward the client;
a reset on one side is passed on as a reset of the other; an EOF is passed on as an EOF (half-close).
``accepted``, ``active`` and ``stats`` count what happened, for ordering assertions without timing.
"""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Final, Literal

import trio

from .trio_helpers import unwrap_single

__all__ = ["FaultProxy", "ProxyStats", "open_fault_proxy"]

CHUNK: Final = 65536
QUEUE_CHUNKS: Final = 16
TICK: Final = 0.02
FIN_DRAIN_TIMEOUT: Final = 10.0

Mode = Literal["pass", "pause", "blackhole"]


@dataclass
class ProxyStats:
    """Counters, summed over connections. ``writes`` counts send_all calls (throttle splits chunks)."""

    bytes_to_target: int = 0
    bytes_to_client: int = 0
    writes: int = 0
    dropped_bytes: int = 0
    rejected: int = 0


def _set_rst(stream: trio.SocketStream) -> None:
    with suppress(OSError):  # already closed
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _shutdown_write(stream: trio.SocketStream) -> None:
    with suppress(OSError):  # not connected any more
        stream.socket.shutdown(socket.SHUT_WR)


class _Conn:
    def __init__(self, proxy: FaultProxy, client: trio.SocketStream) -> None:
        self.proxy = proxy
        self.client = client
        self.target: trio.SocketStream | None = None
        self.scope = trio.CancelScope()
        self.dead = proxy._mode == "blackhole"
        self.ending: Literal["rst", "fin", "close"] | None = None

    def streams(self) -> list[trio.SocketStream]:
        return [self.client] if self.target is None else [self.client, self.target]

    def rst(self) -> None:
        """Reset both sides now (sync: the pumps see their sockets closed and are cancelled)."""
        if self.ending is not None and self.ending != "fin":
            return
        self.ending = "rst"
        self.proxy._conns.discard(self)
        self.scope.cancel()
        for stream in self.streams():
            _set_rst(stream)
            stream.socket.close()

    def fin(self) -> None:
        if self.ending is not None:
            return
        self.ending = "fin"
        self.scope.cancel()
        for stream in self.streams():
            _shutdown_write(stream)

    def kill(self) -> None:
        """Blackhole: never forward again; the sockets stay open."""
        self.dead = True


class FaultProxy:
    """Created by :func:`open_fault_proxy`. ``port``: where clients connect."""

    def __init__(self, target_host: str, target_port: int, host: str, port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self.accepted = 0
        self.stats = ProxyStats()
        self._mode: Mode = "pass"
        self._delay = 0.0
        self._rate: float | None = None
        self._reject = False
        self._conns: set[_Conn] = set()
        self._changed = trio.Event()

    # --- commands -----------------------------------------------------------------------------------

    def pass_(self) -> None:
        self._mode, self._delay, self._rate, self._reject = "pass", 0.0, None, False
        self._notify()

    def delay(self, seconds: float) -> None:
        self._delay = max(0.0, seconds)
        self._notify()

    def throttle(self, bytes_per_second: float) -> None:
        if bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be > 0 (use pause() or blackhole() to stop)")
        self._rate = float(bytes_per_second)
        self._notify()

    def pause(self) -> None:
        self._mode = "pause"
        self._notify()

    def blackhole(self) -> None:
        self._mode = "blackhole"
        for conn in self._conns:
            conn.kill()
        self._notify()

    def cut(self) -> None:
        for conn in list(self._conns):
            conn.rst()
        self._notify()

    def close(self) -> None:
        for conn in list(self._conns):
            conn.fin()
        self._notify()

    def reject_new(self, reject: bool = True) -> None:
        self._reject = reject

    # --- observation --------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Connections currently open (forwarding, paused, dead or closing)."""
        return len(self._conns)

    async def wait_accepted(self, count: int, *, within: float = 15.0) -> None:
        """Wait until ``accepted >= count`` (e.g. an agent's reconnect reached the proxy)."""
        await self._wait_until(lambda: self.accepted >= count, within)

    async def wait_active(self, count: int, *, within: float = 15.0) -> None:
        """Wait until exactly ``count`` connections are open (0: all closed)."""
        await self._wait_until(lambda: self.active == count, within)

    # --- internals ----------------------------------------------------------------------------------

    async def _wait_until(self, condition: Callable[[], bool], within: float) -> None:
        with trio.fail_after(within):
            while not condition():
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self, seconds: float = math.inf) -> None:
        with trio.move_on_after(seconds):
            await self._changed.wait()

    async def _gate(self, conn: _Conn) -> None:
        """Block while this connection may not move bytes (paused, or dead forever)."""
        while conn.dead or self._mode == "pause":
            await self._wait_change()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            stream = await listener.accept()
            self.accepted += 1
            if self._reject:
                self.stats.rejected += 1
                _set_rst(stream)
                stream.socket.close()
            else:
                nursery.start_soon(self._handle, _Conn(self, stream))
            self._notify()

    async def _handle(self, conn: _Conn) -> None:
        self._conns.add(conn)
        try:
            with conn.scope:
                if conn.dead:
                    await trio.sleep_forever()  # accepted during a blackhole: never forwarded
                try:
                    conn.target = await trio.open_tcp_stream(self.target_host, self.target_port)
                except OSError:
                    conn.rst()
                    return
                if conn.dead:  # blackholed while connecting
                    await trio.sleep_forever()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._direction, conn, conn.client, conn.target, True)
                    nursery.start_soon(self._direction, conn, conn.target, conn.client, False)
                conn.ending = conn.ending or "close"  # both directions reached EOF
            if conn.ending == "fin":
                with trio.move_on_after(FIN_DRAIN_TIMEOUT):
                    async with trio.open_nursery() as nursery:
                        for stream in conn.streams():
                            nursery.start_soon(_drain, stream)
        finally:
            self._conns.discard(conn)
            if conn.ending != "rst":
                for stream in conn.streams():
                    stream.socket.close()
            self._notify()

    async def _direction(
        self, conn: _Conn, src: trio.SocketStream, dst: trio.SocketStream, to_target: bool
    ) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes] | None](QUEUE_CHUNKS)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, conn, src, send)
                nursery.start_soon(self._writer, conn, dst, receive, to_target)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            # A reset on one side: pass it on as a reset of the other side (unless we are already
            # ending the connection ourselves, and this error is the echo of that).
            if conn.ending is None:
                conn.rst()

    async def _reader(
        self,
        conn: _Conn,
        src: trio.SocketStream,
        send: trio.MemorySendChannel[tuple[float, bytes] | None],
    ) -> None:
        async with send:
            while True:
                await self._gate(conn)
                data = await src.receive_some(CHUNK)
                if conn.dead:
                    self.stats.dropped_bytes += len(data)
                    continue
                await send.send((trio.current_time(), data) if data else None)
                if not data:
                    return

    async def _writer(
        self,
        conn: _Conn,
        dst: trio.SocketStream,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes] | None],
        to_target: bool,
    ) -> None:
        async with receive:
            async for item in receive:
                if item is None:
                    await self._gate(conn)
                    if not conn.dead:
                        await dst.send_eof()  # half-close passes through
                    return
                read_at, data = item
                # Wait out the delay, re-reading it whenever a command changes the settings.
                while (due := read_at + self._delay) > trio.current_time():
                    await self._wait_change(due - trio.current_time())
                view = memoryview(data)
                while view:
                    await self._gate(conn)
                    if conn.dead:
                        self.stats.dropped_bytes += len(view)
                        break
                    rate = self._rate
                    piece = view if rate is None else view[: max(1, int(rate * TICK))]
                    await dst.send_all(piece)
                    self.stats.writes += 1
                    if to_target:
                        self.stats.bytes_to_target += len(piece)
                    else:
                        self.stats.bytes_to_client += len(piece)
                    view = view[len(piece) :]
                    if rate is not None:
                        await self._wait_change(len(piece) / rate)


async def _drain(stream: trio.SocketStream) -> None:
    try:
        while await stream.receive_some(CHUNK):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@asynccontextmanager
async def open_fault_proxy(
    target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[FaultProxy]:
    """Listen on ``host:port`` (port 0: any; pass an old ``proxy.port`` to restart in place)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    proxy = FaultProxy(target_host, target_port, host, bound)
    try:
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(proxy._accept_loop, listener, nursery)
                yield proxy
                nursery.cancel_scope.cancel()
    finally:
        for listener in listeners:
            listener.socket.close()
