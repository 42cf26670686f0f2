"""Test harness for the agent's exchange handler: a relay-side mux driving ExchangeHandler over the in-memory
transport, and a scripted raw upstream for misbehaviours a well-behaved server cannot produce."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import trio

from protocol import RequestHead
from rtunnel.agent.allowlist import Allowlist
from rtunnel.agent.exchange import ExchangeHandler
from rtunnel.link.mux import Multiplexer, StreamReset

from .memtransport import start_pair

HOST = b"app.example"

# --- harness --------------------------------------------------------------------------------------------


@dataclass
class Tunnel:
    relay: Multiplexer
    agent: Multiplexer
    handler: ExchangeHandler


@asynccontextmanager
async def tunnel(
    upstream_url: str, allowlist: Allowlist | None = None, **kwargs: Any
) -> AsyncIterator[Tunnel]:
    handler = ExchangeHandler(upstream_url, allowlist or Allowlist(), **kwargs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler.run)
        relay, agent, *_ = await start_pair(nursery, handler)
        try:
            yield Tunnel(relay, agent, handler)
        finally:
            relay.abort("test over")
            agent.abort("test over")
            await handler.aclose()
            nursery.cancel_scope.cancel()


@dataclass
class Result:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    interim: list[int] = field(default_factory=list)
    ended_with_reply: bool = False
    trailers: tuple[tuple[bytes, bytes], ...] | None = None

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, values
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def chunks_of(data: bytes, size: int = 65536) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def call(
    relay: Multiplexer,
    method: bytes,
    target: bytes,
    *,
    body: bytes | Sequence[bytes] | None = None,
    content_length: bool = True,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> Result:
    """One exchange as the relay would run it: OPEN, body as DATA (concurrently), REPLY(s), body."""
    pieces: list[bytes] = [] if body is None else chunks_of(body) if isinstance(body, bytes) else list(body)
    all_headers = [(b"Host", HOST), *headers]
    if body is not None and content_length:
        all_headers.append((b"Content-Length", str(sum(map(len, pieces))).encode()))
    stream = await relay.open_stream(RequestHead(method, target, tuple(all_headers)), end_stream=body is None)
    interim: list[int] = []
    received = bytearray()

    async def send_body() -> None:
        # Like the relay: an agent that answered without reading the body (403, 413...) refuses the rest of
        # it with RESET(NO_ERROR) once its response is out; the response side still reads that response.
        with contextlib.suppress(StreamReset):
            for piece in pieces:
                await stream.send_data(piece)
            await stream.send_end()

    try:
        async with trio.open_nursery() as nursery:
            if body is not None:
                nursery.start_soon(send_body)
            while (head := await stream.receive_reply()).is_interim:
                interim.append(head.status)
            ended_with_reply = stream.at_eof
            while chunk := await stream.receive_data():
                received += chunk
    finally:
        stream.close()
    return Result(
        head.status, list(head.headers), bytes(received), interim, ended_with_reply, stream.trailers
    )


# --- scripted upstream: a raw TCP server whose behaviour the test writes --------------------------------


Script = Callable[[trio.SocketStream, int], Awaitable[None]]


@asynccontextmanager
async def scripted_upstream(script: Script) -> AsyncIterator[str]:
    """Serve `script(stream, connection_index)` for each connection; yields the upstream URL."""
    counter = iter(range(1_000_000))

    async def handle(stream: trio.SocketStream) -> None:
        # The agent closing the connection mid-message is expected in several tests.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            await script(stream, next(counter))

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


class ServerConn:
    """A server-side h11 connection for scripts."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER)

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
                continue
            return event

    async def read_request(self, *, body: bool = True) -> h11.Request:
        request = await self.next_event()
        assert isinstance(request, h11.Request), request
        while body and not isinstance(await self.next_event(), h11.EndOfMessage):
            pass
        return request

    async def send(self, *events: h11.Event) -> None:
        for event in events:
            await self.stream.send_all(self.h11.send(event) or b"")

    async def respond(self, status: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        head = [("Content-Length", str(len(body))), *headers]
        await self.send(
            h11.Response(status_code=status, headers=head), h11.Data(data=body), h11.EndOfMessage()
        )
