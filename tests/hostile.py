"""Scripted hostile peers for security tests: a hostile agent (dials a real relay) and a hostile relay (a real
`rtunnel dial` process dials it). Both speak rtunnel.v1 over a real WebSocket (rtunnel.transport), so only the
protocol layer misbehaves: what a compromised peer could send after authenticating.

Frames are hand-written where a well-behaved `protocol.Connection` could never produce them (oversized,
past the window, floods); the hostile relay uses a `protocol.Connection` for the honest part (HELLO, OPEN,
reading REPLYs), so the test can check what the agent answered.

    async with hostile_agent(relay.agents_url, token) as bad:
        await bad.send(frame(0x20, 0, 0, bytes(20000)))    # an unknown frame type over MAX_FRAME_SIZE
        assert await bad.goaway_code() is ErrorCode.FRAME_SIZE_ERROR

    async with hostile_relay() as relay:                   # relay.url for `rtunnel dial`
        link = await relay.accept()
        status, body = await link.request(b"GET", b"/admin")
"""

# ASYNC109: every wait has a built-in fail_after, so a broken product fails a test instead of hanging it.
# ruff: noqa: ASYNC109

from __future__ import annotations

import dataclasses
import struct
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Final

import trio

from protocol import (
    Connection,
    DataReceived,
    ErrorCode,
    Event,
    GoAwayReceived,
    ReplyReceived,
    RequestHead,
    Role,
    Settings,
    StreamEnded,
    StreamReset,
)
from protocol._frames import encode_frame, encode_hello, encode_request_head
from rtunnel import transport

__all__ = [
    "DATA",
    "GOAWAY",
    "OPEN",
    "PING",
    "RESET",
    "WINDOW_UPDATE",
    "Frame",
    "HostileAgent",
    "HostileLink",
    "HostileRelay",
    "frame",
    "hostile_agent",
    "hostile_relay",
    "parse_frames",
]

TIMEOUT: Final = 15.0
HELLO, OPEN, REPLY, DATA, TRAILERS, WINDOW_UPDATE, RESET, PING, GOAWAY = range(9)
END_STREAM: Final = 0x1


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return encode_frame(frame_type, flags, stream_id, payload)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


@dataclasses.dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def error_code(self) -> ErrorCode:
        """The code of a RESET or GOAWAY."""
        raw = self.payload[4:8] if self.type == GOAWAY else self.payload[:4]
        return ErrorCode.from_wire(struct.unpack(">I", raw)[0])


def parse_frames(data: bytes) -> list[Frame]:
    """Whole frames of one WebSocket message (a frame never spans messages, SPEC 2)."""
    frames = []
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        frame_type, flags = data[pos + 3], data[pos + 4]
        stream_id = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        frames.append(Frame(frame_type, flags, stream_id, bytes(data[pos + 9 : pos + 9 + length])))
        pos += 9 + length
    return frames


# --- hostile agent --------------------------------------------------------------------------------------


class HostileAgent:
    """An authenticated agent link that the test drives frame by frame."""

    def __init__(self, link: transport.Transport) -> None:
        self.link = link
        self.received: list[Frame] = []  # every frame from the relay, for assertions
        self._pending: deque[Frame] = deque()
        self.closed = False

    async def send(self, *frames: bytes) -> None:
        """All frames in one WebSocket message."""
        await self.link.send(b"".join(frames))

    async def next_frame(self, *, timeout: float = TIMEOUT) -> Frame | None:
        """The next frame from the relay, or None once the link is closed."""
        with trio.fail_after(timeout):
            while not self._pending:
                if self.closed:
                    return None
                try:
                    message = await self.link.receive()
                except transport.TransportClosed:
                    self.closed = True
                    continue
                frames = parse_frames(message)
                self.received.extend(frames)
                self._pending.extend(frames)
            return self._pending.popleft()

    async def wait_for(self, frame_type: int, *, timeout: float = TIMEOUT) -> Frame:
        with trio.fail_after(timeout):
            while True:
                got = await self.next_frame(timeout=timeout)
                if got is None:
                    raise AssertionError(f"link closed before a frame of type {frame_type}")
                if got.type == frame_type:
                    return got
                if got.type == PING and not got.flags & 1:
                    await self.pong(got)  # stay alive while waiting

    async def pong(self, ping: Frame) -> None:
        with trio.move_on_after(1):
            with suppress(transport.TransportClosed):
                await self.send(frame(PING, 1, 0, ping.payload))

    async def goaway_code(self, *, timeout: float = TIMEOUT) -> ErrorCode:
        """Wait for the relay's GOAWAY and return its error code."""
        return (await self.wait_for(GOAWAY, timeout=timeout)).error_code

    async def wait_closed(self, *, timeout: float = TIMEOUT) -> None:
        with trio.fail_after(timeout):
            while await self.next_frame(timeout=timeout) is not None:
                pass


@asynccontextmanager
async def hostile_agent(
    url: str, token: str | None, *, settings: Settings | None = None, hello: bool = True
) -> AsyncIterator[HostileAgent]:
    """Connect to a relay with a valid token and exchange HELLOs (ours with `settings`)."""
    async with transport.connect(url, token=token, ssl_context=None) as link:
        agent = HostileAgent(link)
        if hello:
            await agent.send(encode_hello((settings or Settings()).to_pairs()))
            first = await agent.next_frame()
            assert first is not None and first.type == HELLO, first
        yield agent
        link.abort()


# --- hostile relay -----------------------------------------------------------------------------------------


class HostileLink:
    """One agent connection to the hostile relay: an honest `Connection` plus raw frame injection."""

    def __init__(self, link: transport.Transport) -> None:
        self.link = link
        self.conn = Connection(Role.ACCEPTOR)
        self.events: list[Event] = []
        self.closed = False

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.link.send(data)

    async def inject(self, *frames: bytes) -> None:
        """Raw frames, in one message, behind whatever the honest connection has queued."""
        await self.link.send(self.conn.data_to_send() + b"".join(frames))

    async def _pump(self) -> None:
        try:
            message = await self.link.receive()
        except transport.TransportClosed:
            self.closed = True
            return
        self.events.extend(self.conn.receive_data(message, trio.current_time()))
        await self.flush()  # PING ACKs, WINDOW_UPDATEs

    async def handshake(self) -> None:
        await self.flush()
        with trio.fail_after(TIMEOUT):
            while self.conn.peer_settings is None:
                await self._pump()
                if self.closed:
                    raise AssertionError("the agent closed before its HELLO")

    async def wait_event(
        self, kind: type[Event], stream_id: int | None = None, *, timeout: float = TIMEOUT
    ) -> Event:
        with trio.fail_after(timeout):
            while True:
                for event in self.events:
                    if isinstance(event, kind) and (
                        stream_id is None or getattr(event, "stream_id", None) == stream_id
                    ):
                        self.events.remove(event)
                        return event
                if self.closed:
                    raise AssertionError(f"link closed before {kind.__name__}")
                await self._pump()

    async def wait_closed(self, *, timeout: float = TIMEOUT) -> None:
        with trio.fail_after(timeout):
            while not self.closed:
                await self._pump()

    async def open(self, method: bytes, target: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> int:
        """An honest OPEN (END_STREAM) of a request the agent must judge."""
        stream_id = self.conn.open_stream(
            RequestHead(method, target, ((b"Host", b"app"), *headers)), end_stream=True
        )
        await self.flush()
        return stream_id

    async def response(self, stream_id: int) -> tuple[int, bytes]:
        """Status and body of the agent's answer on `stream_id` (a RESET raises AssertionError)."""
        body = bytearray()
        status = 0
        with trio.fail_after(TIMEOUT):
            while True:
                for event in list(self.events):
                    if getattr(event, "stream_id", None) != stream_id:
                        continue
                    self.events.remove(event)
                    if isinstance(event, ReplyReceived) and not event.head.is_interim:
                        status = event.head.status
                    elif isinstance(event, DataReceived):
                        body += event.data
                        self.conn.acknowledge_received_data(stream_id, len(event.data))
                    elif isinstance(event, StreamEnded):
                        return status, bytes(body)
                    elif isinstance(event, StreamReset):
                        raise AssertionError(f"stream {stream_id} reset: {event.error_code.name}")
                if self.closed:
                    raise AssertionError("link closed mid-response")
                await self._pump()

    async def request(self, method: bytes, target: bytes) -> tuple[int, bytes]:
        return await self.response(await self.open(method, target))

    async def goaway_code(self, *, timeout: float = TIMEOUT) -> ErrorCode:
        event = await self.wait_event(GoAwayReceived, timeout=timeout)
        assert isinstance(event, GoAwayReceived)
        return event.error_code


def raw_open(stream_id: int, method: bytes, target: bytes, *, end_stream: bool = True) -> bytes:
    """An OPEN frame built by hand (the honest Connection refuses nothing about the target, but this one
    needs no stream bookkeeping)."""
    head = encode_request_head(RequestHead(method, target, ((b"Host", b"app"),)))
    return frame(OPEN, END_STREAM if end_stream else 0, stream_id, head)


class HostileRelay:
    """Accepts agents on a real WebSocket listener; the test takes each connection with `accept()`."""

    def __init__(self) -> None:
        self.url = ""
        self._send, self._receive = trio.open_memory_channel[tuple[transport.Transport, trio.Event]](8)

    async def _handler(self, link: transport.Transport) -> None:
        done = trio.Event()
        await self._send.send((link, done))
        await done.wait()  # the transport lives until the test is done with it

    async def accept(self, *, timeout: float = TIMEOUT) -> HostileLink:
        """The next agent connection, after its HELLO arrived."""
        with trio.fail_after(timeout):
            link, done = await self._receive.receive()
        hostile = HostileLink(link)
        self._done.append(done)
        await hostile.handshake()
        return hostile

    _done: list[trio.Event]


@asynccontextmanager
async def hostile_relay() -> AsyncIterator[HostileRelay]:
    relay = HostileRelay()
    relay._done = []
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            partial(transport.serve, relay._handler, "127.0.0.1", 0, authenticate=lambda token: True)
        )
        relay.url = f"ws://{host}:{port}"
        try:
            yield relay
        finally:
            for done in relay._done:
                done.set()
            nursery.cancel_scope.cancel()
