"""A response that fails after its head and before any of its body (an upstream that died right after sending
its head): nothing of it reached the client yet, so the client gets a 502 rather than a connection closed on
it, with or without a head.

- the relay, in front of a scripted agent: a REPLY and a RESET that arrive in one WebSocket message;
- the agent, in front of an upstream that closes its connection right after a head that announces a body;
- the whole way, client to relay to agent to that upstream;
- and what must not change: a head whose body is slow to start reaches the client at once (server-sent
  events), at the relay and at the agent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import h11
import pytest
import trio

from protocol import ErrorCode, RequestHead, ResponseHead, Role, Settings, encode_hello, encode_response_head
from rtunnel.agent.allowlist import Allowlist
from rtunnel.agent.exchange import ExchangeHandler
from rtunnel.conformance.peers import DATA, END_STREAM, OPEN, REPLY, RESET, Frame, frame, parse_frames, u32
from rtunnel.link.mux import Multiplexer
from rtunnel.net import fastsend

from .agent_harness import HOST, ServerConn, call, scripted_upstream, tunnel
from .memtransport import MemoryTransport, memory_transport_pair, start_pair
from .relay_rig import TIMEOUT, Client, Rig, relay_rig

GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


class ScriptedAgent:
    """An agent link the test writes frame by frame: each `send` is one WebSocket message."""

    def __init__(self, transport: MemoryTransport) -> None:
        self.transport = transport
        self._frames: deque[Frame] = deque()

    async def next_open(self) -> int:
        """The stream id of the relay's next OPEN."""
        with trio.fail_after(TIMEOUT):
            while True:
                while not self._frames:
                    self._frames.extend(parse_frames(await self.transport.receive()))
                got = self._frames.popleft()
                if got.type == OPEN:
                    return got.stream_id

    async def send(self, *frames: bytes) -> None:
        await self.transport.send(b"".join(frames))


@asynccontextmanager
async def scripted_agent(rig: Rig) -> AsyncIterator[ScriptedAgent]:
    """A scripted agent connected to the rig's relay (a real Multiplexer on the relay's side)."""
    relay_end, agent_end = memory_transport_pair()
    relay = Multiplexer(relay_end, Role.ACCEPTOR, settings=Settings(max_concurrent_streams=0))
    await agent_end.send(encode_hello(Settings().to_pairs()))
    await rig.nursery.start(relay.run)
    rig.registry.add(relay)
    try:
        yield ScriptedAgent(agent_end)
    finally:
        relay.abort("test over")


def reply(
    stream_id: int, status: int, headers: tuple[tuple[bytes, bytes], ...], *, end: bool = False
) -> bytes:
    head = encode_response_head(ResponseHead(status, b"", headers))
    return frame(REPLY, END_STREAM if end else 0, stream_id, head)


def reset(stream_id: int, code: ErrorCode = ErrorCode.INTERNAL_ERROR) -> bytes:
    return frame(RESET, 0, stream_id, u32(code))


LENGTH_100 = ((b"Content-Length", b"100"),)
CHUNKED = ((b"Content-Type", b"text/event-stream"),)  # no length: chunked to an HTTP/1.1 client


class Reader:
    """The client's side of one exchange, event by event as the bytes arrive: a 1xx, the head, the body."""

    def __init__(self, client: Client, method: str = "GET") -> None:
        self.client = client
        self.parser = h11.Connection(h11.CLIENT)
        self.parser.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        self.parser.send(h11.EndOfMessage())
        self.interim: list[int] = []

    async def _next(self) -> h11.Event | type[h11.PAUSED]:
        with trio.fail_after(TIMEOUT):
            while (event := self.parser.next_event()) is h11.NEED_DATA:
                self.parser.receive_data(await self.client.stream.receive_some(65536))
        return event  # type: ignore[return-value]

    async def head(self) -> h11.Response:
        """The final response head, as soon as it arrives (interim ones are noted)."""
        while isinstance(event := await self._next(), h11.InformationalResponse):
            self.interim.append(event.status_code)
        assert isinstance(event, h11.Response), event
        return event

    async def body(self) -> bytes:
        body = b""
        while not isinstance(event := await self._next(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            body += event.data
        return body

    async def closed(self) -> bool:
        """After a complete response: the relay closed the connection with nothing more sent."""
        if self.parser.trailing_data[0]:
            return False
        with trio.fail_after(TIMEOUT):
            return await self.client.stream.receive_some(65536) == b""


def header(response: h11.Response, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


@pytest.mark.parametrize(
    ("frames", "interim"),
    [
        pytest.param(lambda sid: [reply(sid, 200, LENGTH_100), reset(sid)], [], id="length"),
        pytest.param(lambda sid: [reply(sid, 200, CHUNKED), reset(sid)], [], id="chunked"),
        # Body bytes that arrived in the same message never reached the client either.
        pytest.param(
            lambda sid: [reply(sid, 200, LENGTH_100), frame(DATA, 0, sid, b"x" * 10), reset(sid)],
            [],
            id="data",
        ),
        # An interim head goes out as it comes: no byte of the response in SPEC 10.1's sense.
        pytest.param(
            lambda sid: [reply(sid, 103, ((b"Link", b"</a>"),)), reply(sid, 200, LENGTH_100), reset(sid)],
            [103],
            id="interim",
        ),
    ],
)
async def test_a_reply_and_a_reset_in_one_message_are_a_502(
    frames: Callable[[int], list[bytes]], interim: list[int]
) -> None:
    async with relay_rig(with_agent=False) as rig, scripted_agent(rig) as agent:
        client = await rig.connect()
        await client.send(GET)
        sid = await agent.next_open()
        await agent.send(*frames(sid))
        reader = Reader(client)
        head = await reader.head()
        assert (reader.interim, head.status_code) == (interim, 502)
        assert header(head, b"content-type") == b"text/plain; charset=utf-8"
        body = await reader.body()
        assert body == b"the agent did not complete the exchange: stream reset (peer, INTERNAL_ERROR)\n"
        # The relay's own answer, then a clean close: nothing of the agent's response after it.
        assert header(head, b"connection") == b"close"
        assert await reader.closed()


async def test_a_refusal_after_the_final_reply_is_a_502_and_not_sent_again() -> None:
    # REFUSED_STREAM says "never processed", which the final REPLY before it contradicts: a POST is not
    # sent again (this agent would never answer a second OPEN).
    async with relay_rig(with_agent=False) as rig, scripted_agent(rig) as agent:
        client = await rig.connect()
        await client.send(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        sid = await agent.next_open()
        await agent.send(reply(sid, 200, LENGTH_100), reset(sid, ErrorCode.REFUSED_STREAM))
        reader = Reader(client, "POST")
        assert (await reader.head()).status_code == 502
        assert b"REFUSED_STREAM" in await reader.body()


async def test_a_head_whose_body_is_slow_to_start_reaches_the_client_at_once() -> None:
    # Server-sent events: the head may come long before the first event. When nothing else of the response
    # has arrived, the head goes out at once, or a client would wait for headers as long as for the first
    # event. (This agent sends its body only once the client has the head.)
    async with relay_rig(with_agent=False) as rig, scripted_agent(rig) as agent:
        client = await rig.connect()
        await client.send(GET)
        sid = await agent.next_open()
        await agent.send(reply(sid, 200, CHUNKED))
        reader = Reader(client)
        assert (await reader.head()).status_code == 200
        await agent.send(frame(DATA, END_STREAM, sid, b"data: 1\n\n"))
        assert await reader.body() == b"data: 1\n\n"


async def head_then_close(stream: trio.SocketStream, index: int) -> None:
    """An upstream that announces 100 bytes of body and closes right after its head, before any of them."""
    await ServerConn(stream).read_request()
    # Head and FIN back to back, with no checkpoint between: the agent finds both when it next runs.
    assert not fastsend.send_nowait(stream, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    stream.socket.close()


async def test_the_agent_answers_502_for_an_upstream_that_closes_after_its_head() -> None:
    async with scripted_upstream(head_then_close) as url, tunnel(url) as t:
        with trio.fail_after(TIMEOUT):
            result = await call(t.relay, b"GET", b"/")  # a RESET after the REPLY would raise here
    assert (result.status, result.ended_with_reply) == (502, False)
    assert b"upstream closed the connection" in result.body


async def test_the_agent_forwards_a_head_whose_body_is_slow_to_start_at_once() -> None:
    go_on = trio.Event()

    async def slow_events(stream: trio.SocketStream, index: int) -> None:
        conn = ServerConn(stream)
        await conn.read_request()
        await conn.send(h11.Response(status_code=200, headers=[("Content-Type", "text/event-stream")]))
        await go_on.wait()
        await conn.send(h11.Data(data=b"data: 1\n\n"), h11.EndOfMessage())

    async with scripted_upstream(slow_events) as url, tunnel(url) as t:
        stream = await t.relay.open_stream(RequestHead(b"GET", b"/", ((b"Host", HOST),)), end_stream=True)
        with trio.fail_after(TIMEOUT):
            head = await stream.receive_reply()  # before the upstream wrote any of its body
        assert head.status == 200
        go_on.set()
        with trio.fail_after(TIMEOUT):
            assert await stream.receive_data() == b"data: 1\n\n"
        stream.close()


async def test_an_upstream_that_closes_after_its_head_is_a_502_for_the_client() -> None:
    async with scripted_upstream(head_then_close) as url, relay_rig(with_agent=False) as rig:
        handler = ExchangeHandler(url, Allowlist())
        pair = await start_pair(
            rig.nursery, handler, relay_options={"settings": Settings(max_concurrent_streams=0)}
        )
        rig.registry.add(pair.relay)
        client = await rig.connect()
        await client.send(GET)
        status, _, body = await client.response()
        assert status == 502
        assert b"upstream closed the connection" in body
        # The agent answered with a complete response: the client's connection goes on.
        await client.send(GET)
        status, _, _ = await client.response()
        assert status == 502
        pair.relay.abort("test over")
        pair.agent.abort("test over")
        await handler.aclose()
