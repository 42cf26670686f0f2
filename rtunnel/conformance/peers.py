"""Scripted peers: an agent that dials a relay, and a relay that an agent dials. Both speak rtunnel.v1 over a
real WebSocket (rtunnel.link.transport), so only the protocol layer misbehaves: what a compromised or broken peer
could send after authenticating. The conformance runner's cases and the security tests drive them.

Frames are hand-written where a well-behaved `protocol.Connection` could never produce them (oversized,
past the window, floods); the scripted relay uses a `protocol.Connection` for the honest part (HELLO, OPEN,
reading REPLYs), so a case can check what the agent answered. Both keep a transcript of the frames they sent
and received, and the peer's WebSocket Close, for the runner's report.

    async with hostile_agent(relay_url, token) as bad:
        await bad.send(frame(0x20, 0, 0, bytes(20000)))    # an unknown frame type over MAX_FRAME_SIZE
        assert await bad.goaway_code() is ErrorCode.FRAME_SIZE_ERROR

    async with hostile_relay() as relay:                   # relay.url for the agent to dial
        link = await relay.accept()
        status, body = await link.request(b"GET", b"/admin")
"""

# ASYNC109: every wait has a built-in fail_after, so a broken peer fails a case instead of hanging it.
# ruff: noqa: ASYNC109

from __future__ import annotations

import dataclasses
import ssl
import struct
from collections import deque
from collections.abc import AsyncIterator, Sequence
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
    encode_frame,
    encode_hello,
    encode_request_head,
)

from ..link import transport

__all__ = [
    "DATA",
    "END_STREAM",
    "GOAWAY",
    "HELLO",
    "OPEN",
    "PING",
    "REPLY",
    "RESET",
    "TRAILERS",
    "WINDOW_UPDATE",
    "Frame",
    "HostileAgent",
    "HostileLink",
    "HostileRelay",
    "describe",
    "frame",
    "hostile_agent",
    "hostile_relay",
    "one_mebibyte",
    "parse_frames",
    "raw_open",
    "Unexpected",
    "Upgrade",
    "u32",
]

TIMEOUT: Final = 15.0
HELLO, OPEN, REPLY, DATA, TRAILERS, WINDOW_UPDATE, RESET, PING, GOAWAY = range(9)
END_STREAM: Final = 0x1
_NAMES: Final = ("HELLO", "OPEN", "REPLY", "DATA", "TRAILERS", "WINDOW_UPDATE", "RESET", "PING", "GOAWAY")


class Unexpected(AssertionError):
    """The peer did not do what a case expected of it (an AssertionError, so tests can use peers directly)."""


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
        return ErrorCode.from_wire(struct.unpack(">I", raw.ljust(4, b"\0"))[0])


def one_mebibyte(ping: bytes) -> list[bytes]:
    """Frames of unknown type (ignored, SPEC 3) then `ping`, 1 MiB in all: the largest message of coalesced
    frames a receiver must accept (SPEC 2)."""
    size = 1 << 20
    frames: list[bytes] = []
    while size - len(ping) > 16393 + 9:
        frames.append(frame(0x20, 0, 0, bytes(16384)))
        size -= 16393
    frames.append(frame(0x20, 0, 0, bytes(size - len(ping) - 9)))
    return [*frames, ping]


def parse_frames(data: bytes | bytearray) -> list[Frame]:
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


def describe(item: Frame) -> str:
    """One line for a report: the frame's type, flags, stream and what its payload means."""
    name = _NAMES[item.type] if item.type < len(_NAMES) else f"type 0x{item.type:x}"
    flags = f" flags=0x{item.flags:x}" if item.flags else ""
    text = f"{name}{flags} stream={item.stream_id} length={len(item.payload)}"
    payload = item.payload
    if item.type in (RESET, GOAWAY) and len(payload) >= (8 if item.type == GOAWAY else 4):
        text += f" code={item.error_code.name}"
        if item.type == GOAWAY:
            text += f" last-stream-id={int.from_bytes(payload[:4], 'big') & 0x7FFFFFFF}"
            if payload[8:]:
                debug = payload[8:].decode("utf-8", "replace")
                text += f" debug={debug[:24]!r}" + ("..." if len(debug) > 24 else "")
    elif item.type == HELLO and len(payload) >= 4:
        text += (
            f" version={int.from_bytes(payload[:2], 'big')} reserved={int.from_bytes(payload[2:4], 'big')}"
        )
    elif item.type == REPLY and len(payload) >= 3:
        text += f" status={int.from_bytes(payload[:2], 'big')}"
    elif item.type == OPEN and payload:
        method = payload[1 : 1 + payload[0]]
        text += f" method={method.decode('latin-1')!r}"
    elif item.type == PING:
        text += f" data={payload.hex()}"
    return text


def _describe_close(close: tuple[int, str] | None) -> str:
    return "no WebSocket Close (TCP connection dropped)" if close is None else f"WebSocket Close {close[0]}"


class _Transcript:
    """What a scripted peer sent and received, for the runner's report."""

    def __init__(self, link: transport.Transport) -> None:
        self.link = link
        self.sent: list[str] = []
        self.got: list[str] = []

    def note_sent(self, data: bytes | bytearray, what: str = "") -> None:
        frames = parse_frames(bytes(data))
        text = "; ".join(describe(f) for f in frames) or "an empty binary message"
        self.sent.append(f"{what}: {text}" if what else text)

    def note_received(self, frames: Sequence[Frame]) -> None:
        self.got.extend(describe(f) for f in frames)

    def note_closed(self) -> None:
        self.got.append(_describe_close(self.link.peer_close))

    @property
    def peer_close(self) -> tuple[int, str] | None:
        return self.link.peer_close

    async def send_split(self, data: bytes, at: int) -> None:
        """The octets of one or more frames in two WebSocket messages, split at octet `at`."""
        self.sent.append(
            f"split across two messages at octet {at}: " + "; ".join(map(describe, parse_frames(data)))
        )
        await self.link.send(data[:at])
        await self.link.send(data[at:])

    async def send_text(self, text: str) -> None:
        self.sent.append(f"a text WebSocket message {text!r}")
        await self.link.send_text(text)


# --- scripted agent ---------------------------------------------------------------------------------------


class HostileAgent(_Transcript):
    """An authenticated agent link that a case drives frame by frame."""

    def __init__(self, link: transport.Transport, timeout: float = TIMEOUT) -> None:
        super().__init__(link)
        self.timeout = timeout
        self.received: list[Frame] = []  # every frame from the relay, for assertions
        self._pending: deque[Frame] = deque()
        self.closed = False

    async def send(self, *frames: bytes) -> None:
        """All frames in one WebSocket message."""
        message = b"".join(frames)
        self.note_sent(message)
        await self.link.send(message)

    async def next_frame(self, *, timeout: float | None = None) -> Frame | None:
        """The next frame from the relay, or None once the link is closed."""
        with trio.fail_after(self.timeout if timeout is None else timeout):
            while not self._pending:
                if self.closed:
                    return None
                try:
                    message = await self.link.receive()
                except transport.TransportClosed:
                    self.closed = True
                    self.note_closed()
                    continue
                frames = parse_frames(message)
                self.note_received(frames)
                self.received.extend(frames)
                self._pending.extend(frames)
            return self._pending.popleft()

    async def wait_for(self, frame_type: int, *, timeout: float | None = None) -> Frame:
        with trio.fail_after(self.timeout if timeout is None else timeout):
            while True:
                got = await self.next_frame(timeout=timeout)
                if got is None:
                    raise Unexpected(f"link closed before a {_NAMES[frame_type]} frame")
                if got.type == frame_type:
                    return got
                if got.type == PING and not got.flags & 1:
                    await self.pong(got)  # stay alive while waiting

    async def pong(self, ping: Frame) -> None:
        with trio.move_on_after(1):
            with suppress(transport.TransportClosed):
                await self.send(frame(PING, 1, 0, ping.payload))

    async def goaway_code(self, *, timeout: float | None = None) -> ErrorCode:
        """Wait for the relay's GOAWAY and return its error code."""
        return (await self.wait_for(GOAWAY, timeout=timeout)).error_code

    async def wait_closed(self, *, timeout: float | None = None) -> tuple[int, str] | None:
        """Wait until the link is closed; the relay's Close (None: it dropped the TCP connection)."""
        with trio.fail_after(self.timeout if timeout is None else timeout):
            while await self.next_frame(timeout=timeout) is not None:
                pass
        return self.peer_close


@asynccontextmanager
async def hostile_agent(
    url: str,
    token: str | None,
    *,
    settings: Settings | None = None,
    hello: bool | bytes = True,
    timeout: float = TIMEOUT,
    extra_headers: Sequence[tuple[str, str]] = (),
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[HostileAgent]:
    """Connect to a relay and exchange HELLOs (ours with `settings`, or exactly the octets `hello`; False: none
    is sent, and the relay's is left unread)."""
    async with transport.connect(
        url, token=token, ssl_context=ssl_context, connect_timeout=timeout, extra_headers=extra_headers
    ) as link:
        agent = HostileAgent(link, timeout)
        if hello is not False:
            await agent.send(
                hello if isinstance(hello, bytes) else encode_hello((settings or Settings()).to_pairs())
            )
            first = await agent.next_frame()
            if first is None or first.type != HELLO:
                raise Unexpected(f"the relay's first frame is not HELLO: {first and describe(first)}")
        yield agent
        link.abort()


# --- scripted relay ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Upgrade:
    """What the agent presented in its WebSocket upgrade request."""

    token: bytes | None
    headers: tuple[tuple[bytes, bytes], ...]


class HostileLink(_Transcript):
    """One agent connection to the scripted relay: an honest `Connection` plus raw frame injection."""

    def __init__(self, link: transport.Transport, timeout: float = TIMEOUT) -> None:
        super().__init__(link)
        self.timeout = timeout
        self.conn = Connection(Role.ACCEPTOR)
        self.events: list[Event] = []
        self.closed = False
        principal = link.principal
        self.upgrade = principal if isinstance(principal, Upgrade) else Upgrade(None, ())

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.note_sent(data)
            await self.link.send(data)

    async def inject(self, *frames: bytes) -> None:
        """Raw frames, in one message, behind whatever the honest connection has queued."""
        message = self.conn.data_to_send() + b"".join(frames)
        self.note_sent(message)
        await self.link.send(message)

    async def _pump(self) -> None:
        try:
            message = await self.link.receive()
        except transport.TransportClosed:
            self.closed = True
            self.note_closed()
            return
        self.note_received(parse_frames(message))
        self.events.extend(self.conn.receive_data(message, trio.current_time()))
        await self.flush()  # PING ACKs, WINDOW_UPDATEs

    async def handshake(self, *, reserved: int = 0) -> None:
        """Send our HELLO (with `reserved` in its reserved field) and wait for the agent's."""
        hello = bytearray(self.conn.data_to_send())
        hello[11:13] = reserved.to_bytes(2, "big")  # 9-octet header, then version u16, reserved u16
        self.note_sent(hello)
        await self.link.send(hello)
        with trio.fail_after(self.timeout):
            while self.conn.peer_settings is None:
                await self._pump()
                if self.closed:
                    raise Unexpected("the agent closed before its HELLO")

    async def wait_event(
        self, kind: type[Event], stream_id: int | None = None, *, timeout: float | None = None
    ) -> Event:
        with trio.fail_after(self.timeout if timeout is None else timeout):
            while True:
                for event in self.events:
                    if isinstance(event, kind) and (
                        stream_id is None or getattr(event, "stream_id", None) == stream_id
                    ):
                        self.events.remove(event)
                        return event
                if self.closed:
                    raise Unexpected(f"link closed before {kind.__name__}")
                await self._pump()

    async def wait_closed(self, *, timeout: float | None = None) -> tuple[int, str] | None:
        """Wait until the agent closed the link; its Close (None: it dropped the TCP connection)."""
        with trio.fail_after(self.timeout if timeout is None else timeout):
            while not self.closed:
                await self._pump()
        return self.peer_close

    async def open(
        self,
        method: bytes,
        target: bytes,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        *,
        host: bytes | None = b"app",
        end_stream: bool = True,
    ) -> int:
        """An honest OPEN of a request the agent must judge (with a Host header unless `host` is None)."""
        host_header = () if host is None else ((b"Host", host),)
        stream_id = self.conn.open_stream(
            RequestHead(method, target, (*host_header, *headers)), end_stream=end_stream
        )
        await self.flush()
        return stream_id

    async def response(self, stream_id: int) -> tuple[int, bytes]:
        """Status and body of the agent's answer on `stream_id` (a RESET raises AssertionError)."""
        status, _, body = await self.full_response(stream_id)
        return status, body

    async def full_response(self, stream_id: int) -> tuple[int, list[ReplyReceived], bytes]:
        """The final status, every REPLY (interim ones included) and the body of the answer on `stream_id`."""
        body = bytearray()
        status = 0
        replies: list[ReplyReceived] = []
        with trio.fail_after(self.timeout):
            while True:
                for event in list(self.events):
                    if getattr(event, "stream_id", None) != stream_id:
                        continue
                    self.events.remove(event)
                    if isinstance(event, ReplyReceived):
                        replies.append(event)
                        if not event.head.is_interim:
                            status = event.head.status
                    elif isinstance(event, DataReceived):
                        body += event.data
                        self.conn.acknowledge_received_data(stream_id, len(event.data))
                    elif isinstance(event, StreamEnded):
                        return status, replies, bytes(body)
                    elif isinstance(event, StreamReset):
                        raise Unexpected(f"stream {stream_id} reset: {event.error_code.name}")
                if self.closed:
                    raise Unexpected("link closed mid-response")
                await self._pump()

    async def request(self, method: bytes, target: bytes) -> tuple[int, bytes]:
        return await self.response(await self.open(method, target))

    async def goaway_code(self, *, timeout: float | None = None) -> ErrorCode:
        event = await self.wait_event(GoAwayReceived, timeout=timeout)
        assert isinstance(event, GoAwayReceived)
        return event.error_code


def raw_open(stream_id: int, method: bytes, target: bytes, *, end_stream: bool = True) -> bytes:
    """An OPEN frame built by hand (the honest Connection refuses nothing about the target, but this one
    needs no stream bookkeeping)."""
    head = encode_request_head(RequestHead(method, target, ((b"Host", b"app"),)))
    return frame(OPEN, END_STREAM if end_stream else 0, stream_id, head)


class HostileRelay:
    """Accepts agents on a real WebSocket listener; a case takes each connection with `accept()`."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.url = ""
        self.timeout = timeout
        self._send, self._receive = trio.open_memory_channel[tuple[transport.Transport, trio.Event]](8)
        self._done: list[trio.Event] = []

    async def _handler(self, link: transport.Transport) -> None:
        done = trio.Event()
        await self._send.send((link, done))
        await done.wait()  # the transport lives until the case is done with it

    async def accept(self, *, timeout: float | None = None, reserved: int = 0) -> HostileLink:
        """The next agent connection, after its HELLO arrived (ours carries `reserved`)."""
        with trio.fail_after(self.timeout if timeout is None else timeout):
            link, done = await self._receive.receive()
        hostile = HostileLink(link, self.timeout)
        self._done.append(done)
        await hostile.handshake(reserved=reserved)
        return hostile

    @staticmethod
    def release(link: HostileLink) -> None:
        """End a connection a case is done with, at once (the agent then reconnects)."""
        link.link.abort()


def _accept_any(token: bytes | None) -> object:
    return Upgrade(token, ())


def _record(principal: object, headers: Sequence[tuple[bytes, bytes]]) -> object:
    assert isinstance(principal, Upgrade)
    return Upgrade(principal.token, tuple(headers))


@asynccontextmanager
async def hostile_relay(timeout: float = TIMEOUT) -> AsyncIterator[HostileRelay]:
    relay = HostileRelay(timeout)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            partial(
                transport.serve, relay._handler, "127.0.0.1", 0, authenticate=_accept_any, authorize=_record
            )
        )
        relay.url = f"ws://{host}:{port}"
        try:
            yield relay
        finally:
            for done in relay._done:
                done.set()
            nursery.cancel_scope.cancel()
