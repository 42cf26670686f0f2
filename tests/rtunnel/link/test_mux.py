"""The multiplexer over an in-memory transport: streams, backpressure, resets, heartbeat, drain."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
import trio.testing

from protocol import ErrorCode, RequestHead, ResponseHead, Role, Settings
from rtunnel.link.mux import LinkDead, Multiplexer, MuxClosed, MuxStream, StreamReset
from rtunnel.link.transport import TransportClosed

from .. import memtransport
from ..memtransport import MemoryTransport, MuxPair, memory_transport_pair, mux_pair, start_pair

GET = RequestHead(b"GET", b"/", ((b"Host", b"x"),))


@pytest.fixture(autouse=True, params=["direct", "writer-task"])
def _direct_or_not(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test twice: with a transport the streams' tasks write to themselves while the link is idle (as
    on ws://), and with one only the writer task sends on (as on wss://)."""
    monkeypatch.setattr(memtransport, "DIRECT", request.param == "direct")


async def echo_handler(stream: MuxStream) -> None:
    await stream.send_reply(ResponseHead(200, b"OK", ()))
    while chunk := await stream.receive_data():
        await stream.send_data(chunk)
    await stream.send_end()


async def exchange(relay: Multiplexer, body: bytes) -> bytes:
    stream = await relay.open_stream(RequestHead(b"POST", b"/echo", ()))
    received = bytearray()

    async def pump_out() -> None:
        view = memoryview(body)
        for offset in range(0, len(body), 65536):
            await stream.send_data(view[offset : offset + 65536])
        await stream.send_end()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump_out)
        head = await stream.receive_reply()
        assert head.status == 200
        while chunk := await stream.receive_data():
            received += chunk
    stream.close()
    return bytes(received)


async def test_many_concurrent_echo_exchanges_are_intact() -> None:
    async with trio.open_nursery() as nursery:
        relay, agent, *_ = await start_pair(nursery, echo_handler)
        bodies = [os.urandom(n) for n in (0, 1, 1000, 300_000, 1_000_000)] * 4
        results: dict[int, bytes] = {}

        async def one(i: int, body: bytes) -> None:
            results[i] = await exchange(relay, body)

        async with trio.open_nursery() as inner:
            for i, body in enumerate(bodies):
                inner.start_soon(one, i, body)
        for i, body in enumerate(bodies):
            assert hashlib.sha256(results[i]).digest() == hashlib.sha256(body).digest()
        assert relay.in_flight == 0
        assert agent.in_flight == 0
        # The memory accounting's running totals come back to zero with the streams.
        assert relay.buffered_bytes == 0
        assert agent.buffered_bytes == 0
        relay.abort("test over")
        agent.abort("test over")


async def test_slow_reader_holds_only_its_window_and_others_proceed() -> None:
    settings = Settings(initial_stream_window=65536, connection_window=1 << 20)
    gate = trio.Event()

    async def slow_download(stream: MuxStream) -> None:
        await stream.send_reply(ResponseHead(200, b"OK", ()))
        # Push far more than the window; send_data must block instead of buffering it all.
        for _ in range(64):
            await stream.send_data(b"x" * 65536)
        await stream.send_end()
        gate.set()

    async def handler(stream: MuxStream) -> None:
        assert stream.request_head is not None
        if stream.request_head.target == b"/slow":
            await slow_download(stream)
        else:
            await echo_handler(stream)

    async with trio.open_nursery() as nursery:
        relay, agent, *_ = await start_pair(nursery, handler, settings=settings)
        slow = await relay.open_stream(RequestHead(b"GET", b"/slow", ()), end_stream=True)
        await slow.receive_reply()
        await trio.testing.wait_all_tasks_blocked()
        # The stalled stream buffered at most its window on the relay, and the agent's writer is blocked.
        assert slow._buffered <= 65536
        assert not gate.is_set()
        assert await exchange(relay, b"y" * 200_000) == b"y" * 200_000
        total = 0
        while chunk := await slow.receive_data():
            total += len(chunk)
        assert total == 64 * 65536
        slow.close()
        relay.abort("done")
        agent.abort("done")


async def test_reset_by_agent_reaches_the_relay_reader() -> None:
    async def resetting(stream: MuxStream) -> None:
        await stream.send_reply(ResponseHead(200, b"OK", ()))
        await stream.send_data(b"partial")
        stream.reset(ErrorCode.INTERNAL_ERROR)

    async with trio.open_nursery() as nursery:
        relay, agent, *_ = await start_pair(nursery, resetting)
        stream = await relay.open_stream(GET, end_stream=True)
        await stream.receive_reply()
        with pytest.raises(StreamReset) as info:
            while await stream.receive_data():
                pass
        assert info.value.error_code is ErrorCode.INTERNAL_ERROR
        assert info.value.remote and not info.value.retryable
        relay.abort("done")
        agent.abort("done")


async def test_dead_link_is_detected_by_both_sides(autojump_clock: trio.testing.MockClock) -> None:
    outcomes: dict[str, type[BaseException]] = {}

    async def run(name: str, mux: Multiplexer, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        try:
            await mux.run(task_status=task_status)
        except (LinkDead, TransportClosed) as exc:
            outcomes[name] = type(exc)

    relay, agent, t_relay, t_agent = mux_pair(echo_handler, ping_interval=5, dead_timeout=20)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "agent", agent)
        await nursery.start(run, "relay", relay)
        # Idle for a long time: pings keep it alive.
        await trio.sleep(300)
        assert outcomes == {}
        start = trio.current_time()
        t_relay.blackholed = True
        t_agent.blackholed = True
    elapsed = trio.current_time() - start
    assert outcomes == {"relay": LinkDead, "agent": LinkDead}
    assert elapsed <= 20 + 5 + 1


async def _first_to_die(
    relay: Multiplexer, agent: Multiplexer, blackhole: MemoryTransport
) -> tuple[str, BaseException, float]:
    """Connect both ends, then blackhole the sends of one transport; run until an end fails (at most 600 s of
    virtual time): which one, why, and how long after the blackhole."""
    outcomes: list[tuple[str, BaseException]] = []

    async def run(name: str, mux: Multiplexer, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        try:
            await mux.run(task_status=task_status)
        except (LinkDead, TransportClosed) as exc:
            outcomes.append((name, exc))
            nursery.cancel_scope.cancel()

    with trio.move_on_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "agent", agent)
            await nursery.start(run, "relay", relay)
            await trio.sleep(60)  # idle, pinging, alive
            assert outcomes == []
            start = trio.current_time()
            blackhole.blackholed = True
    assert outcomes, "neither end noticed anything in 600 s"
    return *outcomes[0], trio.current_time() - start


def _long_lived_agent_pair() -> MuxPair:
    """The relay drops a dead link after 20 s; the agent would wait far longer, so the relay tells first."""
    return mux_pair(echo_handler, ping_interval=5, dead_timeout=20, agent_options={"dead_timeout": 10_000})


async def test_a_send_stuck_for_the_dead_timeout_drops_the_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The agent keeps pinging (it hears nothing back), so the relay is never silent: only its stuck send tells.
    relay, agent, t_relay, _ = _long_lived_agent_pair()
    name, exc, elapsed = await _first_to_die(relay, agent, t_relay)
    assert (name, type(exc)) == ("relay", LinkDead)
    assert "a send has been stuck" in str(exc)
    assert 20 <= elapsed <= 20 + 5 + 5  # the stuck send began at the agent's next ping


async def test_a_silent_peer_is_dropped_at_the_dead_timeout(autojump_clock: trio.testing.MockClock) -> None:
    # The agent reads but what it sends never arrives: the relay's own sends go through, only silence tells.
    relay, agent, _, t_agent = _long_lived_agent_pair()
    name, exc, elapsed = await _first_to_die(relay, agent, t_agent)
    assert (name, type(exc)) == ("relay", LinkDead)
    assert "no data from the peer" in str(exc)
    assert elapsed <= 20 + 5  # silent since its last message before the blackhole, checked every 5 s


async def test_streams_fail_when_the_link_dies_and_unsent_opens_are_retryable() -> None:
    async def never_answers(stream: MuxStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        relay, agent, t_relay, _ = await start_pair(nursery, never_answers)
        sent = await relay.open_stream(GET, end_stream=True)
        await trio.testing.wait_all_tasks_blocked()
        t_relay.blackholed = True
        unsent = await relay.open_stream(GET, end_stream=True)
        await trio.testing.wait_all_tasks_blocked()
        relay.abort("test cut")
        agent.abort("test cut")
    with pytest.raises(StreamReset) as info_sent:
        await sent.receive_reply()
    with pytest.raises(StreamReset) as info_unsent:
        await unsent.receive_reply()
    assert not info_sent.value.retryable
    assert info_unsent.value.retryable
    with pytest.raises(MuxClosed):
        await relay.open_stream(GET)


async def test_goaway_refuses_new_streams_and_lets_old_ones_finish() -> None:
    release = trio.Event()

    async def waits(stream: MuxStream) -> None:
        await release.wait()
        await stream.send_reply(ResponseHead(204, b"No Content", ()), end_stream=True)

    async with trio.open_nursery() as nursery:
        relay, agent, *_ = await start_pair(nursery, waits)
        old = await relay.open_stream(GET, end_stream=True)
        await trio.testing.wait_all_tasks_blocked()
        agent.goaway()
        await trio.testing.wait_all_tasks_blocked()
        assert relay.goaway_received
        with pytest.raises(MuxClosed):
            await relay.open_stream(GET)
        release.set()
        assert (await old.receive_reply()).status == 204
        assert await old.receive_data() == b""
        old.close()
        with trio.fail_after(5):
            await agent.wait_idle()
        relay.abort("done")
        agent.abort("done")


async def test_every_opener_queued_for_a_stream_slot_gets_one_in_turn() -> None:
    """With the agent allowing 2 concurrent streams, 20 exchanges queue for slots and all complete: a freed
    slot must wake the waiters, not only the last one to start waiting."""
    async with trio.open_nursery() as nursery:
        relay, agent, *_ = await start_pair(
            nursery, echo_handler, agent_options={"settings": Settings(max_concurrent_streams=2)}
        )
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            assert await exchange(relay, b"%d" % i * 1000) == b"%d" % i * 1000
            done += 1

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                for i in range(20):
                    inner.start_soon(one, i)
        assert done == 20
        relay.abort("done")
        agent.abort("done")


async def test_interim_replies_piling_up_unread_reset_the_stream() -> None:
    async def flooding(stream: MuxStream) -> None:
        for _ in range(1000):
            await stream.send_reply(ResponseHead(103, b"Early Hints", ((b"Link", b"</a>"),)))
        await stream.send_reply(ResponseHead(200, b"OK", ()), end_stream=True)

    async with trio.open_nursery() as nursery:
        relay, agent, *_ = await start_pair(nursery, flooding)
        stream = await relay.open_stream(GET, end_stream=True)
        await trio.testing.wait_all_tasks_blocked()  # the flood stalls on the cap; nothing read meanwhile
        with pytest.raises(StreamReset) as info:
            while (await stream.receive_reply()).is_interim:
                pass
        assert info.value.error_code is ErrorCode.ENHANCE_YOUR_CALM
        assert relay.in_flight == 1  # until its owner is done with it
        stream.close()
        assert relay.in_flight == 0
        relay.abort("done")
        agent.abort("done")


async def test_writes_the_link_could_not_take_at_once_go_out_whole_and_in_order() -> None:
    """One exchange at a time (its task writes its own frames) over a link that holds one message at a time:
    the writes often find it full, so the message is held and the writer task sends it before anything else;
    every body still arrives intact."""
    t_relay, t_agent = memory_transport_pair(buffer=1, direct=True)
    relay = Multiplexer(t_relay, Role.ACCEPTOR)
    agent = Multiplexer(t_agent, Role.DIALER, handler=echo_handler)
    bodies = [os.urandom(n) for n in (1, 5000, 200_000, 700_000)] * 2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await nursery.start(relay.run)
        results = [await exchange(relay, body) for body in bodies]
        nursery.cancel_scope.cancel()
    assert [hashlib.sha256(r).digest() for r in results] == [hashlib.sha256(b).digest() for b in bodies]
    assert isinstance(t_relay, memtransport.DirectMemoryTransport)
    assert isinstance(t_agent, memtransport.DirectMemoryTransport)
    assert t_relay.messages_held > 0 and t_agent.messages_held > 0
