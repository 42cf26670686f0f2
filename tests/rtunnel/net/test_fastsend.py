"""fastsend.send_all over real sockets: every byte in order when the kernel takes only part of a write, no
interleaving with a second sender, and trio's own errors for a closed or broken socket."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from rtunnel.net import fastsend


async def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def read_exactly(stream: trio.SocketStream, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        data = await stream.receive_some(1 << 20)
        assert data, "EOF before all bytes arrived"
        got += data
    return bytes(got)


async def test_a_write_larger_than_the_socket_buffer_arrives_whole_and_in_order() -> None:
    left, right = await socket_pair()
    payload = os.urandom(8 << 20)  # far beyond what a socket buffer takes at once: the slow path finishes it
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fastsend.send_all, left, payload)
        assert await read_exactly(right, len(payload)) == payload


async def test_a_second_sender_during_a_waiting_write_is_refused_not_interleaved() -> None:
    left, right = await socket_pair()
    first = b"a" * (8 << 20)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fastsend.send_all, left, first)
        await trio.testing.wait_all_tasks_blocked()  # the first write waits for room
        with pytest.raises(trio.BusyResourceError):
            await fastsend.send_all(left, b"b" * 10)
        assert await read_exactly(right, len(first)) == first
    await fastsend.send_all(left, b"after")  # once it is done, the fast path serves again
    assert await read_exactly(right, 5) == b"after"


async def test_closed_and_broken_sockets_raise_trios_errors() -> None:
    left, right = await socket_pair()
    await left.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await fastsend.send_all(left, b"x")
    left, right = await socket_pair()
    await right.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first writes may still be accepted by the kernel
            await fastsend.send_all(left, b"x" * 65536)


async def test_other_streams_use_their_own_send_all() -> None:
    left, right = trio.testing.memory_stream_pair()
    await fastsend.send_all(left, b"memory")
    assert await right.receive_some() == b"memory"
