"""MuxStream as a trio HalfCloseableStream (trio's own generic checks, over the real multiplexer), and how long a
stream counts in the multiplexer's in_flight."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

from protocol import ErrorCode, RequestHead, ResponseHead
from rtunnel.link.mux import Multiplexer, MuxStream, StreamReset

from .. import memtransport
from ..memtransport import running_pair

SWITCH = RequestHead(b"GET", b"/chat", ((b"Host", b"x"), (b"Connection", b"upgrade"), (b"Upgrade", b"x")))

Maker = Callable[[], Awaitable[tuple[MuxStream, MuxStream]]]


@pytest.fixture(params=["direct", "writer-task"])
async def makers(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Maker, Maker]]:
    """(stream_maker, clogged_stream_maker) as trio's checks want them: each call opens a stream over one
    running multiplexer pair and switches it (a 101), giving (the relay's end, the agent's end). A clogged pair
    has so much queued both ways that the next send waits until the other end reads."""
    monkeypatch.setattr(memtransport, "DIRECT", request.param == "direct")
    accepted: trio.MemorySendChannel[MuxStream]
    accepted, arrivals = trio.open_memory_channel[MuxStream](0)

    async def switching(stream: MuxStream) -> None:
        await stream.send_reply(ResponseHead(101, b"Switching Protocols", ()))
        await accepted.send(stream)
        await trio.sleep_forever()  # the check closes the stream; the pair's end cancels this

    async with running_pair(switching) as pair:

        async def stream_maker() -> tuple[MuxStream, MuxStream]:
            relay_end = await pair.relay.open_stream(SWITCH)
            agent_end = await arrivals.receive()
            assert (await relay_end.receive_reply()).status == 101
            return relay_end, agent_end

        async def clogged_stream_maker() -> tuple[MuxStream, MuxStream]:
            ends = await stream_maker()
            for sender in ends:
                while not sender.send_would_wait:
                    await sender.send_all(b"x" * 65536)
                    await trio.testing.wait_all_tasks_blocked()
            return ends

        yield stream_maker, clogged_stream_maker


async def test_mux_stream_is_a_half_closeable_stream(makers: tuple[Maker, Maker]) -> None:
    await trio.testing.check_half_closeable_stream(*makers)


async def test_a_reset_surfaces_as_a_broken_stream_with_the_reset_as_cause(
    makers: tuple[Maker, Maker],
) -> None:
    stream_maker, _ = makers
    relay_end, agent_end = await stream_maker()
    agent_end.reset(ErrorCode.CANCEL)
    with pytest.raises(trio.BrokenResourceError) as info:
        await relay_end.receive_some()
    assert isinstance(info.value.__cause__, StreamReset) and info.value.__cause__.remote
    with pytest.raises(trio.BrokenResourceError):
        await relay_end.send_all(b"late")


async def test_a_stream_reset_by_the_peer_counts_until_its_owner_releases_it() -> None:
    """in_flight (least-loaded routing, metrics, the drain) counts exchanges whose task still runs: a RESET
    from the peer fails the stream at once, but the handler finishing it still holds it."""
    reset_seen = trio.Event()
    release = trio.Event()

    async def finishing_slowly(stream: MuxStream) -> None:
        with pytest.raises(StreamReset):
            while await stream.receive_data():
                pass
        reset_seen.set()
        await release.wait()  # e.g. still writing its access log, or closing an upstream

    async with running_pair(finishing_slowly) as pair:
        relay, agent = pair.relay, pair.agent
        stream = await relay.open_stream(RequestHead(b"POST", b"/", ((b"Host", b"x"),)))
        await stream.send_data(b"part of a body")
        await trio.testing.wait_all_tasks_blocked()
        assert (relay.in_flight, agent.in_flight) == (1, 1)
        stream.reset(ErrorCode.CANCEL)  # the relay's owner gives up: released at once on its side
        assert relay.in_flight == 0
        await reset_seen.wait()
        assert agent.in_flight == 1  # the RESET arrived; the handler is still on it
        release.set()
        await _wait_idle(agent)
        assert agent.in_flight == 0


async def _wait_idle(mux: Multiplexer) -> None:
    with trio.fail_after(5):
        await mux.wait_idle()
