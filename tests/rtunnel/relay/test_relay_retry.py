"""The relay's retry rule (SPEC 10.1), end to end inside one process: a real ClientConnection and registry,
agents as real multiplexers over in-memory links whose handlers the test controls, and trio's mock clock.

- never processed (refused, never written): sent again, whatever the method, body included;
- possibly processed: sent again only if idempotent, at most twice, and never after an agent's own RESET;
- otherwise 502; and a retry waits (up to agent-wait) for an agent to (re)connect.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable

import h11
import pytest
import trio
import trio.testing

from protocol import ErrorCode, ResponseHead
from rtunnel.link.mux import LinkDead, Multiplexer, MuxStream
from rtunnel.link.transport import TransportClosed
from rtunnel.relay.exchange import ClientConnection, HttpLimits
from rtunnel.relay.registry import AgentRegistry

from ..memtransport import mux_pair

Handler = Callable[[MuxStream], Awaitable[None]]


class Agents:
    """Agents connected to one registry; `seen` lists (agent name, method, body digest) of every request."""

    def __init__(self, nursery: trio.Nursery, registry: AgentRegistry) -> None:
        self.nursery = nursery
        self.registry = registry
        self.seen: list[tuple[str, str, str]] = []
        self.links: dict[str, Multiplexer] = {}
        self._changed = trio.Event()

    async def wait_seen(self, count: int) -> None:
        while len(self.seen) < count:
            await self._changed.wait()

    async def connect(self, name: str, behaviour: Handler | None) -> Multiplexer:
        """behaviour None: an agent that refuses every stream (REFUSED_STREAM)."""
        relay_side, agent_side, *_ = mux_pair(None if behaviour is None else self._recording(name, behaviour))
        self.nursery.start_soon(_run_quietly, agent_side)
        await self.nursery.start(_run_quietly, relay_side)
        self.registry.add(relay_side)
        self.links[name] = relay_side
        return relay_side

    def _recording(self, name: str, behaviour: Handler) -> Handler:
        async def handler(stream: MuxStream) -> None:
            body = bytearray()
            while chunk := await stream.receive_data():
                body += chunk
            assert stream.request_head is not None
            self.seen.append((name, stream.request_head.method.decode(), hashlib.sha256(body).hexdigest()))
            self._changed.set()
            self._changed = trio.Event()
            await behaviour(stream)

        return handler

    def kill(self, name: str) -> None:
        mux = self.links.pop(name)
        self.registry.remove(mux)
        mux.abort("killed by the test")


async def _run_quietly(
    mux: Multiplexer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with contextlib.suppress(LinkDead, TransportClosed):
        await mux.run(task_status=task_status)


async def ok(stream: MuxStream) -> None:
    await stream.send_reply(ResponseHead(200, b"OK", ((b"Content-Length", b"2"),)))
    await stream.send_data(b"ok", end_stream=True)


async def hang(stream: MuxStream) -> None:
    await trio.sleep_forever()


async def fail(stream: MuxStream) -> None:
    stream.reset(ErrorCode.INTERNAL_ERROR)


async def request(registry: AgentRegistry, method: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request through a ClientConnection; returns (status, body)."""
    client, server = trio.testing.memory_stream_pair()
    connection = ClientConnection(server, registry, HttpLimits(), client_ip="192.0.2.1")
    parser = h11.Connection(h11.CLIENT)
    headers = [("Host", "example"), ("Content-Length", str(len(body)))]
    data = parser.send(h11.Request(method=method, target="/x", headers=headers))
    data += parser.send(h11.Data(data=body)) if body else b""
    data += parser.send(h11.EndOfMessage())
    status, received = 0, bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.serve)
        await client.send_all(data)
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                parser.receive_data(await client.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                received += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        await client.aclose()
    return status, bytes(received)


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


async def test_a_refused_post_is_sent_again_with_its_body_to_another_agent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = AgentRegistry(agent_wait=10)
    body = bytes(range(256)) * 100  # 25 KiB: held for a replay
    async with trio.open_nursery() as nursery:
        agents = Agents(nursery, registry)
        await agents.connect("ok", ok)
        await agents.connect("refuses", None)  # newest: picked first on a tie
        assert await request(registry, "POST", body) == (200, b"ok")
        nursery.cancel_scope.cancel()
    assert agents.seen == [("ok", "POST", digest(body))]


async def test_a_refused_request_waits_for_the_next_agent(autojump_clock: trio.testing.MockClock) -> None:
    registry = AgentRegistry(agent_wait=10)
    async with trio.open_nursery() as nursery:
        agents = Agents(nursery, registry)
        await agents.connect("refuses", None)

        async def a_new_agent_later() -> None:
            await trio.sleep(3)
            agents.kill("refuses")
            await agents.connect("new", ok)

        nursery.start_soon(a_new_agent_later)
        start = trio.current_time()
        assert await request(registry, "POST", b"payload") == (200, b"ok")
        assert trio.current_time() - start >= 3
        nursery.cancel_scope.cancel()
    assert agents.seen == [("new", "POST", digest(b"payload"))]


async def test_a_post_that_may_have_been_processed_is_never_sent_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = AgentRegistry(agent_wait=10)
    async with trio.open_nursery() as nursery:
        agents = Agents(nursery, registry)
        await agents.connect("spare", ok)
        await agents.connect("dies", hang)

        async def kill_once_processed() -> None:
            await agents.wait_seen(1)
            agents.kill("dies")

        nursery.start_soon(kill_once_processed)
        status, text = await request(registry, "POST", b"apply once")
        nursery.cancel_scope.cancel()
    assert status == 502 and b"connection was lost" in text
    assert agents.seen == [("dies", "POST", digest(b"apply once"))]  # the spare agent never saw it


async def test_a_get_whose_link_died_is_sent_again_once_waiting_for_a_reconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = AgentRegistry(agent_wait=10)
    async with trio.open_nursery() as nursery:
        agents = Agents(nursery, registry)
        await agents.connect("dies", hang)

        async def kill_and_reconnect() -> None:
            await agents.wait_seen(1)
            agents.kill("dies")
            await trio.sleep(2)  # the agent's backoff
            await agents.connect("back", ok)

        nursery.start_soon(kill_and_reconnect)
        assert await request(registry, "GET") == (200, b"ok")
        nursery.cancel_scope.cancel()
    assert [name for name, *_ in agents.seen] == ["dies", "back"]


async def test_a_get_is_sent_at_most_twice_when_its_links_keep_dying(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = AgentRegistry(agent_wait=10)
    async with trio.open_nursery() as nursery:
        agents = Agents(nursery, registry)
        for name in ("c", "b", "a"):
            await agents.connect(name, hang)

        async def kill_whoever_gets_it() -> None:
            for killed in range(3):
                await agents.wait_seen(killed + 1)
                agents.kill(agents.seen[killed][0])

        nursery.start_soon(kill_whoever_gets_it)
        status, text = await request(registry, "GET")
        nursery.cancel_scope.cancel()
    assert status == 502 and b"gave up after 2 attempts" in text
    assert len(agents.seen) == 2


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_reset_from_the_agent_is_not_retried(
    method: str, autojump_clock: trio.testing.MockClock
) -> None:
    registry = AgentRegistry(agent_wait=10)
    async with trio.open_nursery() as nursery:
        agents = Agents(nursery, registry)
        await agents.connect("spare", ok)
        await agents.connect("fails", fail)
        status, text = await request(registry, method)
        nursery.cancel_scope.cancel()
    assert status == 502 and b"did not complete" in text
    assert [name for name, *_ in agents.seen] == ["fails"]


async def test_no_agent_within_agent_wait_is_a_503(autojump_clock: trio.testing.MockClock) -> None:
    registry = AgentRegistry(agent_wait=10)
    start = trio.current_time()
    status, _ = await request(registry, "GET")
    assert status == 503
    assert trio.current_time() - start == pytest.approx(10)


async def test_a_response_head_that_is_not_valid_http_is_a_502_and_frees_its_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def bad_header(stream: MuxStream) -> None:
        await stream.send_reply(ResponseHead(200, b"OK", ((b"X-Evil", b"a\r\nSet-Cookie: x=1"),)))
        await stream.send_data(b"ok", end_stream=True)

    registry = AgentRegistry(agent_wait=10)
    async with trio.open_nursery() as nursery:
        agents = Agents(nursery, registry)
        mux = await agents.connect("bad", bad_header)
        status, _ = await request(registry, "GET")
        assert status == 502
        assert mux.in_flight == 0
        assert agents.seen == [("bad", "GET", digest(b""))]
        nursery.cancel_scope.cancel()


async def refuse_after_reading(stream: MuxStream) -> None:
    # REFUSED_STREAM says "not processed", so only the body decides whether a retry is possible.
    stream.reset(ErrorCode.REFUSED_STREAM)


@pytest.mark.parametrize(("size", "resent"), [(64 * 1024, True), (64 * 1024 + 1, False)])
async def test_a_refused_body_is_resent_only_if_the_relay_still_holds_all_of_it(
    size: int, resent: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """64 KiB of request body are held for a replay; a longer one was streamed and is gone, so the request
    cannot be sent again: 502, never a truncated body to another agent."""
    registry = AgentRegistry(agent_wait=10)
    body = os.urandom(size)
    async with trio.open_nursery() as nursery:
        agents = Agents(nursery, registry)
        await agents.connect("spare", ok)
        await agents.connect("refuses", refuse_after_reading)  # newest: picked first
        status, text = await request(registry, "POST", body)
        nursery.cancel_scope.cancel()
    if resent:
        assert (status, text) == (200, b"ok")
        assert agents.seen == [("refuses", "POST", digest(body)), ("spare", "POST", digest(body))]
    else:
        assert status == 502 and b"REFUSED_STREAM" in text
        assert agents.seen == [("refuses", "POST", digest(body))]


async def test_a_request_is_sent_five_times_at_most(autojump_clock: trio.testing.MockClock) -> None:
    registry = AgentRegistry(agent_wait=10)
    async with trio.open_nursery() as nursery:
        agents = Agents(nursery, registry)
        for name in ("a", "b"):
            await agents.connect(name, refuse_after_reading)
        status, text = await request(registry, "POST", b"refused everywhere")
        nursery.cancel_scope.cancel()
    assert status == 502 and b"gave up after 5 attempts" in text
    assert len(agents.seen) == 5


async def test_a_refusal_from_the_only_agent_goes_back_to_the_same_connection_after_agent_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # SPEC 10.1: with no other agent, the relay waits up to --agent-wait for one, then sends the refused
    # request again on the connection that refused it (still open: a refusal says nothing about the link).
    registry = AgentRegistry(agent_wait=10)
    times: list[float] = []

    async def refuse_once(stream: MuxStream) -> None:
        times.append(trio.current_time())
        if len(times) == 1:
            stream.reset(ErrorCode.REFUSED_STREAM)
        else:
            await ok(stream)

    async with trio.open_nursery() as nursery:
        agents = Agents(nursery, registry)
        only = await agents.connect("only", refuse_once)
        assert await request(registry, "POST", b"body") == (200, b"ok")
        assert not only.is_closed and agents.links == {"only": only}
        nursery.cancel_scope.cancel()
    assert [name for name, *_ in agents.seen] == ["only", "only"]
    assert times[1] - times[0] >= registry.agent_wait  # virtual time: it waited for another agent first
