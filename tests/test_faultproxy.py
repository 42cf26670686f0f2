"""Tests of tests/faultproxy.py against a small trio echo server (no timing thresholds).

"Nothing arrives" is checked with a short move_on_after: a slow machine can only make that check pass more
easily, never fail it. Everything that must happen is awaited under fail_after(WAIT).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio

from .faultproxy import TICK, FaultProxy, open_fault_proxy
from .ports import refused_port, reserved_port

WAIT = 15.0
QUIET = 0.3  # how long "nothing arrives" is watched


@dataclass
class EchoServer:
    port: int
    connections: int = 0
    received: list[bytes] = field(default_factory=list)
    eofs: int = 0
    resets: int = 0
    changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(WAIT):
            while not condition():
                await self.changed.wait()


async def _echo(server: EchoServer, stream: trio.SocketStream) -> None:
    server.connections += 1
    try:
        while data := await stream.receive_some(65536):
            server.received.append(data)
            await stream.send_all(data)
        server.eofs += 1
        server.notify()
        await stream.send_eof()
        # Wait for the client's close, so that our close never races unread bytes into a RST.
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        server.resets += 1
        server.notify()


@asynccontextmanager
async def echo_and_proxy(port: int = 0) -> AsyncIterator[tuple[EchoServer, FaultProxy]]:
    async with trio.open_nursery() as nursery:
        server = EchoServer(0)

        async def handler(stream: trio.SocketStream) -> None:
            await _echo(server, stream)

        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        async with open_fault_proxy("127.0.0.1", server.port, port=port) as proxy:
            yield server, proxy
        nursery.cancel_scope.cancel()


async def connect(proxy: FaultProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", proxy.port)


async def receive_exactly(stream: trio.SocketStream, n: int) -> tuple[bytes, int]:
    """Read n bytes; also return in how many receive_some pieces they came."""
    buf = bytearray()
    pieces = 0
    with trio.fail_after(WAIT):
        while len(buf) < n:
            data = await stream.receive_some(65536)
            assert data, f"EOF after {len(buf)} of {n} bytes"
            buf += data
            pieces += 1
    return bytes(buf), pieces


async def roundtrip(stream: trio.SocketStream, data: bytes) -> tuple[bytes, int]:
    """Send and receive concurrently (a big payload would deadlock if sent first)."""
    result: list[tuple[bytes, int]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, data)
        result.append(await receive_exactly(stream, len(data)))
    return result[0]


async def assert_silent(stream: trio.SocketStream) -> None:
    with trio.move_on_after(QUIET):
        data = await stream.receive_some(65536)
        pytest.fail(f"expected nothing, got {data!r}")


async def test_pass_echoes_bytes_intact_and_half_close() -> None:
    async with echo_and_proxy() as (server, proxy):
        stream = await connect(proxy)
        data = os.urandom(1 << 20)
        got, _ = await roundtrip(stream, data)
        assert got == data
        await stream.send_eof()
        with trio.fail_after(WAIT):
            assert await stream.receive_some(10) == b""  # the server's EOF came back through
        assert server.eofs == 1
        assert proxy.stats.bytes_to_target == proxy.stats.bytes_to_client == len(data)
        await stream.aclose()


async def test_cut_resets_both_sides() -> None:
    async with echo_and_proxy() as (server, proxy):
        stream = await connect(proxy)
        assert (await roundtrip(stream, b"hello"))[0] == b"hello"
        proxy.cut()
        with trio.fail_after(WAIT), pytest.raises(trio.BrokenResourceError) as info:
            await stream.receive_some(10)
        assert isinstance(info.value.__cause__, ConnectionResetError)
        await server.wait_until(lambda: server.resets == 1)
        assert proxy.active == 0
        await stream.aclose()


async def test_close_sends_eof_both_ways() -> None:
    async with echo_and_proxy() as (server, proxy):
        stream = await connect(proxy)
        assert (await roundtrip(stream, b"hello"))[0] == b"hello"
        proxy.close()
        with trio.fail_after(WAIT):
            assert await stream.receive_some(10) == b""
        await server.wait_until(lambda: server.eofs == 1)
        await stream.aclose()
        await proxy.wait_active(0)  # the proxy closed once both peers had closed: no RST
        assert server.resets == 0


async def test_blackhole_keeps_sockets_open_and_drops_bytes() -> None:
    async with echo_and_proxy() as (server, proxy):
        old = await connect(proxy)
        assert (await roundtrip(old, b"before"))[0] == b"before"
        proxy.blackhole()
        await old.send_all(b"lost")  # the socket is still open: sending works
        await assert_silent(old)

        during = await connect(proxy)  # accepted, but never connected to the target
        await during.send_all(b"also lost")
        await assert_silent(during)
        assert proxy.accepted == 2
        assert server.connections == 1

        proxy.pass_()
        # Decision: blackholed connections stay dead; their bytes were dropped, not held.
        await old.send_all(b"after")
        await assert_silent(old)
        await assert_silent(during)
        assert server.received == [b"before"]

        new = await connect(proxy)
        assert (await roundtrip(new, b"fresh"))[0] == b"fresh"
        assert proxy.active == 3  # two dead but open, one live
        for stream in (old, during, new):
            await stream.aclose()


async def test_cut_closes_blackholed_connections() -> None:
    async with echo_and_proxy() as (_, proxy):
        stream = await connect(proxy)
        assert (await roundtrip(stream, b"x"))[0] == b"x"
        proxy.blackhole()
        proxy.cut()
        with trio.fail_after(WAIT), pytest.raises(trio.BrokenResourceError):
            await stream.receive_some(10)
        await stream.aclose()


async def test_pause_holds_bytes_and_resume_delivers_them() -> None:
    async with echo_and_proxy() as (_, proxy):
        stream = await connect(proxy)
        assert (await roundtrip(stream, b"a"))[0] == b"a"
        proxy.pause()
        await stream.send_all(b"held")
        await assert_silent(stream)
        proxy.pass_()
        assert (await receive_exactly(stream, 4))[0] == b"held"
        await stream.aclose()


async def test_delay_holds_bytes_until_due_and_keeps_order() -> None:
    async with echo_and_proxy() as (_, proxy):
        stream = await connect(proxy)
        proxy.delay(60)
        await stream.send_all(b"late")
        await assert_silent(stream)
        proxy.pass_()  # re-times the waiting chunk: due now
        assert (await receive_exactly(stream, 4))[0] == b"late"

        proxy.delay(0.05)
        pieces = [f"{i:04d};".encode() for i in range(200)]
        async with trio.open_nursery() as nursery:

            async def send_pieces() -> None:
                for piece in pieces:
                    await stream.send_all(piece)

            nursery.start_soon(send_pieces)
            got, _ = await receive_exactly(stream, sum(map(len, pieces)))
        assert got == b"".join(pieces)
        await stream.aclose()


async def test_throttle_delivers_in_many_pieces() -> None:
    async with echo_and_proxy() as (_, proxy):
        stream = await connect(proxy)
        rate = 4 << 20
        proxy.throttle(rate)
        data = os.urandom(1 << 20)
        writes_before = proxy.stats.writes
        got, _ = await roundtrip(stream, data)
        assert got == data
        per_piece = int(rate * TICK)
        # Both directions are paced: each one is split into pieces of at most rate * TICK bytes.
        assert proxy.stats.writes - writes_before >= 2 * (len(data) // per_piece)

        proxy.throttle(64 << 10)  # ~1.3 KiB pieces, 20 ms apart
        small = os.urandom(16 << 10)
        got, pieces = await roundtrip(stream, small)
        assert got == small
        assert pieces >= 2
        await stream.aclose()


async def test_throttle_rejects_nonpositive_rate() -> None:
    async with echo_and_proxy() as (_, proxy):
        with pytest.raises(ValueError, match="must be > 0"):
            proxy.throttle(0)


async def test_reject_new_resets_new_connections_only() -> None:
    async with echo_and_proxy() as (server, proxy):
        existing = await connect(proxy)
        assert (await roundtrip(existing, b"one"))[0] == b"one"
        proxy.reject_new(True)
        # The kernel completes the handshake, then the reset arrives: trio's connect sees it (it checks
        # SO_ERROR after the socket turns writable) or else the first read does. Either is a refusal.
        with trio.fail_after(WAIT), pytest.raises((trio.BrokenResourceError, OSError)):
            refused = await connect(proxy)
            try:
                await refused.receive_some(10)
            finally:
                await refused.aclose()
        assert proxy.stats.rejected == 1
        assert (await roundtrip(existing, b"two"))[0] == b"two"
        proxy.reject_new(False)
        later = await connect(proxy)
        assert (await roundtrip(later, b"three"))[0] == b"three"
        assert server.connections == 2
        for stream in (existing, later):
            await stream.aclose()


async def test_target_down_resets_client_and_wait_accepted() -> None:
    with refused_port() as dead_port, trio.fail_after(WAIT):
        async with open_fault_proxy("127.0.0.1", dead_port) as proxy:
            stream = await connect(proxy)
            await proxy.wait_accepted(1)
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some(10)
            await stream.aclose()


async def test_restart_on_same_port() -> None:
    with reserved_port() as port:
        async with echo_and_proxy(port) as (_, proxy):
            assert proxy.port == port
        async with echo_and_proxy(port) as (_, again):
            assert again.port == port
            stream = await connect(again)
            assert (await roundtrip(stream, b"back"))[0] == b"back"
            await stream.aclose()
