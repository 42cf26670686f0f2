"""An in-process relay HTTP side for limit, smuggling and fuzz tests: `relay.exchange.ClientConnection` over trio
memory streams, in front of a fake agent (a real `Multiplexer` pair over the in-memory transport).

The fake agent records every request head and body it receives (`rig.agent.seen`): what the upstream would
have been sent. It answers ``200`` with ``METHOD TARGET`` and the body length, except:

* ``/hold/<key>``: waits for ``rig.agent.release(key)`` first (or until the relay resets the stream: `reset`);
* ``/big/<n>``: a body of n bytes.
"""

# ASYNC109: every wait has a built-in fail_after (virtual time under autojump), so a broken relay fails a test
# instead of hanging it.
# ruff: noqa: ASYNC109

from __future__ import annotations

import re
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import h11
import trio
import trio.testing

from protocol import RequestHead, ResponseHead, Settings
from rtunnel.link.mux import Multiplexer, MuxStream
from rtunnel.net.clientaddr import TrustedProxies
from rtunnel.net.limits import Counter
from rtunnel.relay.exchange import ClientConnection, HttpLimits
from rtunnel.relay.registry import AgentRegistry

from .memtransport import start_pair

TIMEOUT = 10.0


class Frozen(Exception):
    """The event loop stopped running other tasks: some task loops without ever reaching a checkpoint."""


@contextmanager
def unless_frozen(seconds: float = 30.0) -> Iterator[None]:
    """Fail instead of hanging when a task never yields. A trio timeout cannot fire then (nothing runs the
    scheduler), so this is a real-time alarm signal, delivered to whatever Python code runs at the time; the
    block then fails with Frozen, whatever that code made of the interruption."""
    fired = False

    def alarm(signum: int, frame: object) -> None:
        nonlocal fired
        fired = True
        raise Frozen(f"no progress for {seconds:g} s of real time: a task loops without yielding")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if fired:
            raise Frozen(
                f"the event loop froze for {seconds:g} s of real time (a task loops without yielding)"
            )


@dataclass
class Seen:
    head: RequestHead
    body: bytes = b""
    complete: bool = False  # the request direction ended normally (not reset)
    reset: bool = False  # the relay reset the stream while it was held


@dataclass
class FakeAgent:
    seen: list[Seen] = field(default_factory=list)
    _releases: dict[bytes, trio.Event] = field(default_factory=dict)

    def release(self, key: str) -> None:
        self._releases.setdefault(key.encode(), trio.Event()).set()

    async def __call__(self, stream: MuxStream) -> None:
        head = stream.request_head
        assert head is not None
        record = Seen(head)
        self.seen.append(record)
        body = bytearray()
        try:
            while chunk := await stream.receive_data():
                body += chunk
            record.complete = True
        finally:
            record.body = bytes(body)
        target = head.target
        if target.startswith(b"/hold/"):
            with trio.CancelScope() as scope:
                stream.cancel_on_reset(scope)
                await self._releases.setdefault(target[6:], trio.Event()).wait()
            if scope.cancelled_caught:
                record.reset = True
                return
        if match := re.fullmatch(rb"/big/(\d+)", target):
            payload = bytes(int(match.group(1)))
        else:
            payload = b"%s %s %d" % (head.method, target, len(body))
        reply = ResponseHead(200, b"OK", ((b"Content-Length", str(len(payload)).encode()),))
        await stream.send_reply(reply)
        await stream.send_data(payload, end_stream=True)

    @property
    def targets(self) -> list[bytes]:
        return [s.head.target for s in self.seen]


@dataclass
class Client:
    """The client end of one connection to the relay."""

    stream: trio.abc.Stream
    done: trio.Event
    buffer: bytes = b""
    eof: bool = False

    async def send(self, data: bytes) -> bool:
        """False if the relay had closed the connection already."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def send_eof(self) -> None:
        await self.stream.send_eof()  # type: ignore[attr-defined]

    async def _fill(self) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            self.buffer += data
        else:
            self.eof = True

    async def response(
        self, method: bytes = b"GET", *, timeout: float = TIMEOUT
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Next response: status, headers (lower-case names), body."""
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        status, headers, body = 0, [], bytearray()
        with trio.fail_after(timeout):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if not self.buffer and not self.eof:
                        await self._fill()
                    if self.buffer:
                        conn.receive_data(self.buffer)
                        self.buffer = b""
                    elif self.eof:
                        conn.receive_data(b"")
                elif isinstance(event, h11.Response):
                    status, headers = event.status_code, list(event.headers)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise EOFError(f"no complete response: {event!r}")
        self.buffer = conn.trailing_data[0] + self.buffer
        return status, headers, bytes(body)

    async def closed(self, *, timeout: float = TIMEOUT) -> bool:
        """True once the relay closed the connection with nothing more sent."""
        with trio.fail_after(timeout):
            while not self.eof and not self.buffer:
                await self._fill()
        return self.eof and not self.buffer

    async def read_all(self, *, timeout: float = TIMEOUT) -> bytes:
        """Everything until the relay closes the connection."""
        with trio.fail_after(timeout):
            while not self.eof:
                await self._fill()
        return self.buffer


@dataclass
class Rig:
    registry: AgentRegistry
    agent: FakeAgent
    limits: HttpLimits
    exchanges: Counter
    nursery: trio.Nursery
    relay_mux: Multiplexer | None = None

    async def connect(
        self, client_ip: str = "192.0.2.1", *, lockstep: bool = False, trusted: TrustedProxies | None = None
    ) -> Client:
        """A new client connection, served by a ClientConnection in the rig's nursery."""
        if lockstep:
            client_end, relay_end = trio.testing.lockstep_stream_pair()
        else:
            client_end, relay_end = trio.testing.memory_stream_pair()
        done = trio.Event()
        connection = ClientConnection(
            relay_end,
            self.registry,
            self.limits,
            client_ip=client_ip,
            exchanges=self.exchanges,
            trusted_proxies=trusted,
        )

        async def serve() -> None:
            try:
                await connection.serve()
            finally:
                await trio.aclose_forcefully(relay_end)
                done.set()

        self.nursery.start_soon(serve)
        return Client(client_end, done)

    async def assert_refused(self, raw: bytes, status: int) -> None:
        """`raw`, then a second request on the same connection: `raw` is answered with `status` and
        Connection: close, the connection closed, and nothing (the second request least of all) reached the
        agent."""
        client = await self.connect()
        await client.send(raw + b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        got, headers, _ = await client.response()
        assert got == status
        assert (b"connection", b"close") in headers
        assert await client.closed()
        assert self.agent.seen == []

    async def roundtrip(self, data: bytes, client_ip: str = "192.0.2.1") -> bytes:
        """Send `data`, then EOF; everything the relay sent back until it closed. (A client that half-closes
        has abandoned its exchange: only for requests the relay answers itself.)"""
        client = await self.connect(client_ip)
        await client.send(data)
        await client.send_eof()
        return await client.read_all()

    async def request(self, data: bytes, client_ip: str = "192.0.2.1") -> tuple[int, bytes]:
        """Send `data` on a new connection; status and body of the first response."""
        client = await self.connect(client_ip)
        await client.send(data)
        status, _, body = await client.response()
        return status, body


@asynccontextmanager
async def relay_rig(
    limits: HttpLimits | None = None,
    *,
    with_agent: bool = True,
    agent_wait: float = 0.0,
    agent_settings: Settings | None = None,
) -> AsyncIterator[Rig]:
    limits = limits or HttpLimits()
    registry = AgentRegistry(agent_wait)
    agent = FakeAgent()
    async with trio.open_nursery() as nursery:
        rig = Rig(registry, agent, limits, Counter(per_key=limits.max_exchanges_per_ip), nursery)
        if with_agent:
            pair = await start_pair(
                nursery,
                agent,
                relay_options={"settings": Settings(max_concurrent_streams=0)},
                agent_options={"settings": agent_settings or Settings()},
            )
            rig.relay_mux = pair.relay
            registry.add(rig.relay_mux)
        try:
            yield rig
        finally:
            nursery.cancel_scope.cancel()
