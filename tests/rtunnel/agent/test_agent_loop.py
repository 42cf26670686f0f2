"""The agent's reconnect loop, with a fake connector and trio's mock clock (hours of backoff in milliseconds).

The fake connector plays the relay: each attempt follows a script ("refused", "timeout", "401", "ok"), and an
"ok" attempt gets an in-memory transport whose other end is a real relay-side Multiplexer run by the test.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

import rtunnel.agent.dialer
from protocol import RequestHead, ResponseHead, Role
from rtunnel.agent.backoff import Backoff
from rtunnel.agent.dialer import Agent, AgentConfig, Link
from rtunnel.link.mux import LinkDead, Multiplexer, MuxStream
from rtunnel.link.transport import AuthRejected, ConnectError, TransportClosed

from ..memtransport import MemoryTransport, memory_transport_pair

GET = RequestHead(b"GET", b"/", ((b"Host", b"x"),))


async def no_content(stream: MuxStream) -> None:
    await stream.send_reply(ResponseHead(204, b"No Content", ()), end_stream=True)


@dataclass
class Session:
    """One successful connection, seen from the fake relay."""

    mux: Multiplexer
    to_agent: MemoryTransport  # the relay's end of the link
    started: float
    ended: trio.Event = field(default_factory=trio.Event)


class FakeRelay:
    def __init__(self, nursery: trio.Nursery, script: list[str], *, dead_timeout: float = 20.0) -> None:
        self._nursery = nursery
        self.script = script
        self.dead_timeout = dead_timeout
        self.attempts: list[tuple[str, float]] = []  # (url, time) of every connect call
        self.sessions: list[Session] = []
        self._changed = trio.Event()

    @asynccontextmanager
    async def connect(
        self, url: str, *, token: str | None, ssl_context: object, connect_timeout: float
    ) -> AsyncIterator[Link]:
        self.attempts.append((url, trio.current_time()))
        self._notify()
        outcome = self.script.pop(0) if self.script else "ok"
        if outcome == "refused":
            raise ConnectError(f"cannot connect to relay {url}: connection refused")
        if outcome == "timeout":
            await trio.sleep(connect_timeout)
            raise ConnectError(f"cannot connect to relay {url}: timed out after {connect_timeout:g} s")
        if outcome == "401":
            raise AuthRejected(f"relay {url} refused the connection (401 Unauthorized); check the token")
        assert outcome == "ok", outcome
        to_agent, to_relay = memory_transport_pair()
        mux = Multiplexer(to_agent, Role.ACCEPTOR, ping_interval=5, dead_timeout=self.dead_timeout)
        session = Session(mux, to_agent, trio.current_time())
        self.sessions.append(session)
        self._nursery.start_soon(self._serve, session)
        try:
            yield to_relay
        finally:
            to_relay.abort()

    async def _serve(self, session: Session) -> None:
        try:
            await session.mux.run()
        except (LinkDead, TransportClosed):
            pass
        finally:
            session.to_agent.abort()  # as the real relay closes the WebSocket once its handler returns
            session.ended.set()
            self._notify()

    async def wait_attempts(self, count: int) -> None:
        while len(self.attempts) < count:
            await self._changed.wait()

    async def wait_sessions(self, count: int) -> Session:
        while len(self.sessions) < count:
            await self._changed.wait()
        session = self.sessions[count - 1]
        await session.mux.wait_ready()
        return session

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class RecordingBackoff(Backoff):
    """The real backoff (seeded), recording the ceiling each delay was drawn under."""

    instances: list[RecordingBackoff] = []  # noqa: RUF012 (reset by the fixture)

    def __init__(self, initial: float, cap: float) -> None:
        super().__init__(initial, cap, rng=random.Random(len(self.instances)))
        self.ceilings: list[float] = []
        self.delays: list[float] = []
        RecordingBackoff.instances.append(self)

    def next_delay(self) -> float:
        self.ceilings.append(min(self.cap, self.initial * 2**self.attempts))
        delay = super().next_delay()
        self.delays.append(delay)
        return delay


@pytest.fixture(autouse=True)
def recording_backoff(monkeypatch: pytest.MonkeyPatch) -> type[RecordingBackoff]:
    RecordingBackoff.instances = []
    monkeypatch.setattr(rtunnel.agent.dialer, "Backoff", RecordingBackoff)
    return RecordingBackoff


def make_agent(relay: FakeRelay, *urls: str, **config: float) -> Agent:
    return Agent(AgentConfig(relay_urls=urls or ("ws://relay",), **config), no_content, connect=relay.connect)  # type: ignore[arg-type]


async def test_failed_attempts_back_off_with_jitter_under_a_doubling_ceiling(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "rtunnel.agent")
    async with trio.open_nursery() as nursery:
        relay = FakeRelay(nursery, ["refused"] * 10)
        nursery.start_soon(make_agent(relay, backoff_initial=0.5, backoff_cap=8.0).run)
        await relay.wait_sessions(1)
        await trio.testing.wait_all_tasks_blocked()  # the agent's side of the handshake, and its log line
        nursery.cancel_scope.cancel()
    times = [t for _, t in relay.attempts]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    (backoff,) = RecordingBackoff.instances
    assert backoff.ceilings == [0.5, 1, 2, 4, 8, 8, 8, 8, 8, 8]
    assert gaps == pytest.approx(backoff.delays)
    assert all(0 <= gap <= ceiling for gap, ceiling in zip(gaps, backoff.ceilings, strict=True))
    assert len(set(gaps)) == len(gaps)  # jittered, not a fixed schedule
    failures = [r.getMessage() for r in caplog.records if "next attempt in" in r.getMessage()]
    assert len(failures) == 10
    assert all("connection refused" in line for line in failures)
    assert "(first failure)" in failures[0] and "(10 failures in a row)" in failures[-1]
    # The logged delay is the one waited.
    for line, delay in zip(failures, backoff.delays, strict=True):
        assert f"next attempt in {delay:.1f} s" in line
    assert any(r.getMessage() == "connected to ws://relay" for r in caplog.records)


async def test_a_401_is_retried_slowly_and_logged_as_an_error(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        relay = FakeRelay(nursery, ["401", "401"])
        nursery.start_soon(make_agent(relay, backoff_initial=0.5, backoff_cap=2.0).run)
        await relay.wait_sessions(1)
        nursery.cancel_scope.cancel()
    times = [t for _, t in relay.attempts]
    # 60 s, as docs/operations.md ("Outages") documents: the value itself, not whatever the module's
    # constant happens to be.
    assert [b - a for a, b in itertools.pairwise(times)] == [60.0, 60.0]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert all("401" in e and "next attempt in 60.0 s" in e for e in errors)


async def test_timeouts_keep_backing_off(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Each attempt takes the whole connect timeout, longer than healthy_after: the backoff must not mistake
    # a slow failure for a healthy connection and start again from the bottom.
    async with trio.open_nursery() as nursery:
        relay = FakeRelay(nursery, ["timeout"] * 6)
        agent = make_agent(relay, backoff_initial=0.5, backoff_cap=30.0, connect_timeout=10, healthy_after=5)
        nursery.start_soon(agent.run)
        await relay.wait_sessions(1)
        nursery.cancel_scope.cancel()
    assert RecordingBackoff.instances[0].ceilings == [0.5, 1, 2, 4, 8, 16]
    assert all(
        "timed out after 10 s" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    )


async def test_a_healthy_connection_resets_the_backoff_and_a_short_one_does_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        relay = FakeRelay(nursery, ["refused"] * 4)
        nursery.start_soon(make_agent(relay, backoff_initial=1.0, backoff_cap=60.0, healthy_after=10).run)
        first = await relay.wait_sessions(1)
        await trio.sleep(3)  # up, but not for long: the relay drops it
        first.to_agent.abort()
        await relay.wait_attempts(6)  # 4 refused, 1 short session, then a retry
        (backoff,) = RecordingBackoff.instances
        assert backoff.ceilings == [1, 2, 4, 8, 16]  # kept growing
        second = await relay.wait_sessions(2)
        await trio.sleep(60)  # healthy for a minute
        second.to_agent.abort()
        await relay.wait_sessions(3)
        assert backoff.ceilings == [1, 2, 4, 8, 16, 1]  # started again from the bottom
        nursery.cancel_scope.cancel()


async def test_a_silent_relay_is_detected_and_the_agent_reconnects(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        relay = FakeRelay(nursery, [], dead_timeout=1000)  # the fake relay itself never gives up
        agent = make_agent(relay, ping_interval=2, dead_timeout=8, backoff_initial=0.5, backoff_cap=1)
        nursery.start_soon(agent.run)
        first = await relay.wait_sessions(1)
        await trio.sleep(100)  # idle, but pings keep it alive
        assert len(relay.sessions) == 1
        cut = trio.current_time()
        first.to_agent.blackholed = True  # the relay's side stops sending anything (pongs included)
        await relay.wait_sessions(2)
        back = trio.current_time()
        nursery.cancel_scope.cancel()
    # Silence is counted from the last byte received (a pong, shortly before the cut): detection within the
    # dead timeout plus one heartbeat tick, then one backoff delay.
    assert back - cut <= 8 + 2 + 0.5
    lost = [r.getMessage() for r in caplog.records if "connection lost" in r.getMessage()]
    assert lost and "no data from the peer" in lost[0]


async def test_each_relay_url_has_its_own_loop(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        # Attempts alternate between the URLs only by timing, so script per URL instead.
        relay = FakeRelay(nursery, [])
        down: list[float] = []

        @asynccontextmanager
        async def connect(url: str, **kwargs: object) -> AsyncIterator[Link]:
            if url == "ws://down":
                down.append(trio.current_time())
                raise ConnectError("cannot connect to relay down: connection refused")
            async with relay.connect(url, **kwargs) as link:  # type: ignore[arg-type]
                yield link

        agent = Agent(AgentConfig(relay_urls=["ws://up", "ws://down"]), no_content, connect=connect)  # type: ignore[arg-type]
        nursery.start_soon(agent.run)
        session = await relay.wait_sessions(1)
        await trio.sleep(120)
        assert list(agent.connections) == ["ws://up"]  # one relay down does not disturb the other
        assert len(down) > 5
        stream = await session.mux.open_stream(GET, end_stream=True)
        assert (await stream.receive_reply()).status == 204
        nursery.cancel_scope.cancel()


async def test_drain_sends_goaway_and_does_not_reconnect(autojump_clock: trio.testing.MockClock) -> None:
    release = trio.Event()

    async def slow(stream: MuxStream) -> None:
        await release.wait()
        await stream.send_reply(ResponseHead(200, b"OK", ()), end_stream=True)

    async with trio.open_nursery() as nursery:
        relay = FakeRelay(nursery, [])
        agent = Agent(AgentConfig(relay_urls=["ws://relay"]), slow, connect=relay.connect)  # type: ignore[arg-type]
        nursery.start_soon(agent.run)
        session = await relay.wait_sessions(1)
        in_flight = await session.mux.open_stream(GET, end_stream=True)
        await trio.testing.wait_all_tasks_blocked()
        drained = trio.Event()

        async def drain() -> None:
            await agent.drain(grace=30)
            drained.set()

        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        assert session.mux.goaway_received
        assert not drained.is_set()
        release.set()  # the exchange in progress finishes normally
        assert (await in_flight.receive_reply()).status == 200
        in_flight.close()
        session.mux.abort("the agent is draining and has no exchange left")  # what the real relay does
        with trio.fail_after(1):
            await drained.wait()
    assert len(relay.attempts) == 1


async def test_drain_cuts_what_is_left_after_the_grace_period(autojump_clock: trio.testing.MockClock) -> None:
    async def never(stream: MuxStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        relay = FakeRelay(nursery, [])
        agent = Agent(AgentConfig(relay_urls=["ws://relay"]), never, connect=relay.connect)  # type: ignore[arg-type]
        nursery.start_soon(agent.run)
        session = await relay.wait_sessions(1)
        await session.mux.open_stream(GET, end_stream=True)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await agent.drain(grace=30)
        assert trio.current_time() - start == pytest.approx(30)
        await session.ended.wait()
    assert len(relay.attempts) == 1
