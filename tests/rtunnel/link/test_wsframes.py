"""The link's own frame splitting (rtunnel.link.wsframes) under a real Transport on a real socket pair: whatever
frames a peer sends, cut wherever the socket cuts them, the messages come out whole and in order, pings are
answered, and what the protocol object must refuse is still refused."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from rtunnel.link.wsframes import HeadEnd
from rtunnel.link.wslink import Transport
from rtunnel.link.wsterms import TextMessage, TransportClosed

# A message: ("binary", payload) or ("fragments", [payload, ...]); "ping" frames go anywhere between frames.
_SIZES = st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 70_000]) | st.integers(0, 3000)
_PAYLOADS = _SIZES.map(lambda n: random.Random(n).randbytes(n))
_MESSAGES = st.one_of(
    st.tuples(st.just("binary"), _PAYLOADS),
    st.tuples(st.just("fragments"), st.lists(_PAYLOADS, min_size=2, max_size=3)),
)


def _frames(messages: list[tuple[str, object]], pings: list[bool]) -> list[Frame]:
    """The frames of `messages`, with a ping before a message or inside a fragmented one where `pings` says."""
    frames: list[Frame] = []
    flags = iter(pings * 4)
    for kind, body in messages:
        if next(flags, False):
            frames.append(Frame(Opcode.PING, b"p"))
        if kind == "binary":
            assert isinstance(body, bytes)
            frames.append(Frame(Opcode.BINARY, body))
            continue
        assert isinstance(body, list)
        for i, part in enumerate(body):
            opcode = Opcode.BINARY if i == 0 else Opcode.CONT
            frames.append(Frame(opcode, part, fin=i == len(body) - 1))
            if i == 0 and next(flags, False):
                frames.append(Frame(Opcode.PING, b"q"))  # control frames may come between fragments
    return frames


def _expected(messages: list[tuple[str, object]]) -> list[bytes]:
    return [body if kind == "binary" else b"".join(body) for kind, body in messages]  # type: ignore[arg-type]


async def _link(server_side: bool, max_size: int | None = 1 << 20) -> tuple[Transport, trio.SocketStream]:
    """A Transport on one end of a socket pair (the relay's side when `server_side`), and the raw other end."""
    ours, theirs = trio.socket.socketpair()
    proto: ServerProtocol | ClientProtocol
    if server_side:
        proto = ServerProtocol(state=State.OPEN, max_size=max_size)
    else:
        proto = ClientProtocol(parse_uri("ws://relay/"), state=State.OPEN, max_size=max_size)
    return Transport(trio.SocketStream(ours), proto, "peer", 1.0), trio.SocketStream(theirs)


async def _send_cut(peer: trio.SocketStream, data: bytes, cuts: list[int]) -> None:
    """Write `data` in pieces, each one its own write, so the reader meets every cut."""
    start = 0
    for cut in sorted(set(cuts)):
        await peer.send_all(data[start:cut])
        await trio.lowlevel.checkpoint()
        start = cut
    await peer.send_all(data[start:])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    server_side=st.booleans(),
    messages=st.lists(_MESSAGES, min_size=1, max_size=6),
    pings=st.lists(st.booleans(), min_size=1, max_size=6),
    cut_points=st.lists(st.floats(0, 1), max_size=8),
)
def test_messages_come_out_whole_and_in_order_wherever_the_socket_cuts(
    server_side: bool, messages: list[tuple[str, object]], pings: list[bool], cut_points: list[float]
) -> None:
    async def main() -> None:
        link, peer = await _link(server_side)
        frames = _frames(messages, pings)
        pings_sent = sum(frame.opcode is Opcode.PING for frame in frames)
        # frames to a server are masked: the peer of a server-side link is a client
        data = b"".join(frame.serialize(mask=server_side) for frame in frames)
        received: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_cut, peer, data, [int(p * len(data)) for p in cut_points])
            with trio.fail_after(10):
                for _ in messages:
                    received.append(bytes(await link.receive()))
        assert received == _expected(messages)
        # Each ping is answered in front of the next message the link writes.
        await link.send(b"last")
        reader: ServerProtocol | ClientProtocol
        reader = (
            ClientProtocol(parse_uri("ws://relay/"), state=State.OPEN)
            if server_side
            else ServerProtocol(state=State.OPEN)
        )
        answered: list[Frame] = []
        with trio.fail_after(10):
            while not answered or answered[-1].opcode is not Opcode.BINARY:
                reader.receive_data(await peer.receive_some(65536))
                answered += [e for e in reader.events_received() if isinstance(e, Frame)]
        assert [f.opcode for f in answered] == [Opcode.PONG] * pings_sent + [Opcode.BINARY]
        link.abort()

    trio.run(main)


@pytest.mark.parametrize("server_side", [True, False])
async def test_a_message_spanning_many_reads_arrives_whole(server_side: bool) -> None:
    link, peer = await _link(server_side)
    payload = random.Random(1).randbytes(700_000)
    data = Frame(Opcode.BINARY, payload).serialize(mask=server_side)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_cut, peer, data, list(range(1, len(data), 9_999)))
        with trio.fail_after(10):
            assert await link.receive() == payload


async def test_without_a_size_limit_every_frame_goes_through_the_protocol_object() -> None:
    link, peer = await _link(True, max_size=None)
    payload = random.Random(2).randbytes(100_000)
    await peer.send_all(b"".join(Frame(Opcode.BINARY, p).serialize(mask=True) for p in (b"a", payload)))
    # A header that claims 2**50 octets: no buffer is sized by it (the protocol object keeps what arrives).
    await peer.send_all(bytes([0x82, 0xFF]) + (1 << 50).to_bytes(8, "big") + b"mask" + b"abc")
    await peer.aclose()
    with trio.fail_after(5):
        assert [await link.receive(), await link.receive()] == [b"a", payload]
        with pytest.raises(TransportClosed, match="peer closed the TCP connection"):
            await link.receive()


async def test_a_text_message_ends_what_the_link_hands_out_after_the_messages_before_it() -> None:
    link, peer = await _link(True)
    frames = [Frame(Opcode.BINARY, b"first"), Frame(Opcode.TEXT, b"text"), Frame(Opcode.BINARY, b"after")]
    await peer.send_all(b"".join(f.serialize(mask=True) for f in frames))
    with trio.fail_after(5):
        assert await link.receive() == b"first"
        with pytest.raises(TextMessage):
            await link.receive()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (Frame(Opcode.BINARY, b"x" * 300).serialize(mask=False), 1002),  # a client must mask
        (bytes([0x82 | 0x40, 0x81]) + b"\0\0\0\0" + b"x", 1002),  # RSV1 without an extension
        (bytes([0x82, 0xFF]) + (1 << 40).to_bytes(8, "big") + b"\0\0\0\0", 1009),  # over max_size
    ],
)
async def test_what_the_protocol_refuses_is_refused_with_its_close_code(raw: bytes, code: int) -> None:
    link, peer = await _link(True)
    await peer.send_all(Frame(Opcode.BINARY, b"ok").serialize(mask=True) + raw)
    with trio.fail_after(5):
        async with link.running():  # its writer sends the Close the protocol queued
            assert await link.receive() == b"ok"
            with pytest.raises(TransportClosed):
                await link.receive()
            answer = await peer.receive_some(65536)
            link.abort()
    assert answer[0] == 0x88 and Close.parse(answer[2:]).code == code


def test_head_end_is_found_when_the_blank_line_is_split_between_reads() -> None:
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    frames = b"\x82\x02hi"
    for cut in range(1, len(head) + len(frames)):
        finder = HeadEnd()
        data = head + frames
        first, behind = finder.split(data[:cut])
        if behind is None:
            second, behind = finder.split(data[cut:])
            assert (first + second, behind) == (head, frames)
        else:
            assert (first, behind + data[cut:]) == (head, frames)


@pytest.mark.parametrize("server_side", [True, False])
async def test_the_peer_closing_inside_a_large_message_ends_the_link(server_side: bool) -> None:
    link, peer = await _link(server_side)
    data = Frame(Opcode.BINARY, bytes(200_000)).serialize(mask=server_side)
    await peer.send_all(data[:100_000])
    await peer.aclose()
    with trio.fail_after(5), pytest.raises(TransportClosed, match="peer closed the TCP connection"):
        await link.receive()


async def test_an_abort_wakes_a_receive_waiting_inside_a_large_message() -> None:
    link, peer = await _link(True)
    await peer.send_all(Frame(Opcode.BINARY, bytes(200_000)).serialize(mask=True)[:100_000])
    errors: list[str] = []

    async def receive() -> None:
        with pytest.raises(TransportClosed) as caught:
            await link.receive()
        errors.append(caught.value.reason)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            link.abort()
    assert errors == ["aborted locally"]
