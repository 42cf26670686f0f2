"""Cases for a relay: the runner dials it as a scripted agent and checks the transport, the handshake and the
connection errors. Every case opens its own connection, so a connection error in one cannot hide another's
result. relay_exchanges.py has the cases that also need the relay's HTTP side.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import ssl
import struct
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from protocol import (
    ErrorCode,
    encode_hello,
)

from ..link import transport
from .peers import (
    DATA,
    END_STREAM,
    GOAWAY,
    HELLO,
    OPEN,
    PING,
    RESET,
    WINDOW_UPDATE,
    Frame,
    HostileAgent,
    Unexpected,
    frame,
    hostile_agent,
    one_mebibyte,
    u32,
)
from .runner import Level, Probe, Skip, Suite

MUST, SHOULD = Level.MUST, Level.SHOULD


@dataclasses.dataclass(frozen=True)
class RelayTarget:
    url: str  # ws://HOST:PORT[/path], where agents connect
    token: str | None
    http_url: str | None = None  # http://HOST:PORT, where clients connect (None: those cases are skipped)
    timeout: float = 5.0
    ssl_context: ssl.SSLContext | None = None  # for wss:// (None: the system's CAs)


suite: Suite[RelayTarget] = Suite()


@asynccontextmanager
async def connected(
    target: RelayTarget, probe: Probe, *, hello: bool | bytes = True, url: str | None = None
) -> AsyncIterator[HostileAgent]:
    async with hostile_agent(
        url or target.url, target.token, hello=hello, timeout=target.timeout, ssl_context=target.ssl_context
    ) as agent:
        probe.watch(agent)
        yield agent


async def ping(agent: HostileAgent, data: bytes = b"rtunnel!") -> None:
    """The relay is still processing frames: a PING comes back acknowledged."""
    await agent.send(frame(PING, 0, 0, data))
    await _expect_ack(agent, data)


async def _expect_ack(agent: HostileAgent, data: bytes) -> None:
    while True:
        got = await agent.wait_for(PING)
        if got.flags & 1:
            if got.payload != data:
                raise Unexpected(f"PING ACK carries {got.payload.hex()}, not {data.hex()}")
            return


async def _connection_error(agent: HostileAgent, code: ErrorCode, close_code: int) -> None:
    """SPEC 10: GOAWAY with the code, then the WebSocket Close handshake with the code of SPEC 2.1."""
    got = await agent.next_frame()
    while got is not None and got.type != GOAWAY:
        got = await agent.next_frame()
    if got is None:
        raise Unexpected(f"the connection ended without a GOAWAY {code.name}")
    if got.error_code is not code:
        raise Unexpected(f"GOAWAY {got.error_code.name}, expected {code.name}")
    close = await agent.wait_closed()
    if close is None:
        raise Unexpected(f"no WebSocket Close after the GOAWAY (expected {close_code})")
    if close[0] != close_code:
        raise Unexpected(f"WebSocket Close {close[0]}, expected {close_code}")


def _settings(hello: Frame) -> dict[int, int]:
    payload = hello.payload
    return {
        int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
        for i in range(4, len(payload) - 5, 6)
    }


# -- transport and handshake ------------------------------------------------------------------------------


@suite.case(
    "2", MUST, "upgrade on the URL's path with rtunnel.v1 and the token; the relay's first frame is HELLO"
)
async def _upgrade(target: RelayTarget, probe: Probe) -> None:
    async with connected(target, probe, hello=False) as agent:
        first = await agent.next_frame()
        if first is None or first.type != HELLO:
            raise Unexpected("the first frame is not HELLO")


@suite.case("2", SHOULD, "an upgrade on another path is accepted too")
async def _any_path(target: RelayTarget, probe: Probe) -> None:
    parts = urllib.parse.urlsplit(target.url)
    url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/conformance/any/path", "", ""))
    async with connected(target, probe, url=url) as agent:
        await ping(agent)


async def _raw_upgrade(target: RelayTarget, probe: Probe, extra: list[str]) -> int:
    scheme, host, port, path = transport.parse_relay_url(target.url)
    if scheme != "ws":
        raise Skip("needs a ws:// relay URL")
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    probe.sent.append("upgrade request: " + " | ".join(lines))
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    status_line = data.split(b"\r\n", 1)[0].decode("latin-1")
    probe.got.append(f"status line: {status_line!r}")
    parts = status_line.split(" ")
    if len(parts) < 2 or not parts[1].isdigit():
        raise Unexpected(f"not an HTTP response: {status_line!r}")
    return int(parts[1])


@suite.case("2", MUST, "an upgrade without the token is refused with 401")
async def _no_token(target: RelayTarget, probe: Probe) -> None:
    if not target.token:
        raise Skip("needs --token")
    status = await _raw_upgrade(target, probe, ["Sec-WebSocket-Protocol: rtunnel.v1"])
    if status != 401:
        raise Unexpected(f"status {status}, expected 401")


@suite.case("2", MUST, "an upgrade that does not offer rtunnel.v1 is answered 426")
async def _no_subprotocol(target: RelayTarget, probe: Probe) -> None:
    extra = [f"Authorization: Bearer {target.token}"] if target.token else []
    status = await _raw_upgrade(target, probe, [*extra, "Sec-WebSocket-Protocol: rtunnel.v9"])
    if status != 426:
        raise Unexpected(f"status {status}, expected 426")


@suite.case("4.1", MUST, "the relay's HELLO: version 1, reserved 0, 4 + 6n octets, settings in range")
async def _relay_hello(target: RelayTarget, probe: Probe) -> None:
    async with connected(target, probe) as agent:
        hello = agent.received[0]
        payload = hello.payload
        if (len(payload) - 4) % 6 or payload[:2] != b"\0\1" or payload[2:4] != b"\0\0":
            raise Unexpected(f"HELLO payload {payload[:4].hex()}... of {len(payload)} octets")
        settings = _settings(hello)
        for setting_id in (1, 2):
            value = settings.get(setting_id, 16384 if setting_id == 1 else 65536)
            if not 1024 <= value <= 16777215:
                raise Unexpected(f"setting {setting_id} = {value} is out of range")


@suite.case("4.1", MUST, "a HELLO with a non-zero reserved field is accepted")
async def _hello_reserved(target: RelayTarget, probe: Probe) -> None:
    hello = bytearray(encode_hello([]))
    hello[11:13] = b"\xab\xcd"
    async with connected(target, probe, hello=bytes(hello)) as agent:
        await ping(agent)


@suite.case("4.8", MUST, "a PING is answered with a PING ACK carrying the same 8 octets")
async def _ping_ack(target: RelayTarget, probe: Probe) -> None:
    async with connected(target, probe) as agent:
        await ping(agent, bytes(range(1, 9)))


@suite.case("2", MUST, "frames coalesced into one message are all processed, in order")
async def _coalesced(target: RelayTarget, probe: Probe) -> None:
    async with connected(target, probe) as agent:
        await agent.send(*(frame(PING, 0, 0, struct.pack(">Q", i)) for i in range(3)))
        for i in range(3):
            await _expect_ack(agent, struct.pack(">Q", i))


@suite.case("2", MUST, "a frame split across two messages is accepted")
async def _split(target: RelayTarget, probe: Probe) -> None:
    async with connected(target, probe) as agent:
        await agent.send_split(frame(PING, 0, 0, b"splitted"), 5)
        await _expect_ack(agent, b"splitted")


@suite.case("2", MUST, "a message of 1 MiB of coalesced frames is accepted")
async def _large_message(target: RelayTarget, probe: Probe) -> None:
    async with connected(target, probe) as agent:
        await agent.send(*one_mebibyte(frame(PING, 0, 0, b"mebibyte")))
        await _expect_ack(agent, b"mebibyte")


@suite.case("2", MUST, "an empty binary message is ignored")
async def _empty_message(target: RelayTarget, probe: Probe) -> None:
    async with connected(target, probe) as agent:
        await agent.send(b"")
        await ping(agent)


@suite.case("3", MUST, "a frame of an unknown type is skipped, and undefined flags are ignored")
async def _unknown_type(target: RelayTarget, probe: Probe) -> None:
    async with connected(target, probe) as agent:
        await agent.send(frame(0x20, 0xFF, 0, b"future"), frame(PING, 0xFE, 0, b"flagged!"))
        await _expect_ack(agent, b"flagged!")


# -- connection errors ----------------------------------------------------------------------------------


@suite.case("2.1", MUST, "a text message: GOAWAY PROTOCOL_ERROR, then Close 1003")
async def _text(target: RelayTarget, probe: Probe) -> None:
    async with connected(target, probe) as agent:
        await agent.send_text("hello")
        await _connection_error(agent, ErrorCode.PROTOCOL_ERROR, transport.CLOSE_UNSUPPORTED_DATA)


@suite.case("3.1", MUST, "a frame over the relay's MAX_FRAME_SIZE: GOAWAY FRAME_SIZE_ERROR, then Close 1002")
async def _oversized(target: RelayTarget, probe: Probe) -> None:
    async with connected(target, probe) as agent:
        limit = _settings(agent.received[0]).get(1, 16384)
        await agent.send(frame(0x20, 0, 0, bytes(limit + 1)))
        await _connection_error(agent, ErrorCode.FRAME_SIZE_ERROR, transport.CLOSE_PROTOCOL_ERROR)


_ERRORS: list[tuple[str, str, bool | bytes, bytes, ErrorCode]] = [
    ("4.1", "a second HELLO", True, encode_hello([]), ErrorCode.PROTOCOL_ERROR),
    ("4.1", "a first frame other than HELLO", False, frame(PING, 0, 0, bytes(8)), ErrorCode.PROTOCOL_ERROR),
    ("4.1", "a HELLO of version 2", False, encode_hello([], version=2), ErrorCode.PROTOCOL_ERROR),
    (
        "4.1",
        "a HELLO payload not of 4 + 6n octets",
        False,
        frame(HELLO, 0, 0, b"\0\1\0\0\0"),
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    (
        "4.9",
        "a GOAWAY payload shorter than 8 octets",
        True,
        frame(GOAWAY, 0, 0, u32(0)),
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    (
        "4.8",
        "a PING payload other than 8 octets",
        True,
        frame(PING, 0, 0, bytes(7)),
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    ("4", "a PING on a stream", True, frame(PING, 0, 1, bytes(8)), ErrorCode.PROTOCOL_ERROR),
    (
        "4.6",
        "a WINDOW_UPDATE of 0 on stream 0",
        True,
        frame(WINDOW_UPDATE, 0, 0, u32(0)),
        ErrorCode.PROTOCOL_ERROR,
    ),
    ("6", "a DATA frame on an idle stream", True, frame(DATA, 0, 2, b"x"), ErrorCode.PROTOCOL_ERROR),
    (
        "6",
        "an OPEN with the acceptor's (even) parity",
        True,
        frame(OPEN, END_STREAM, 2, b"\x03GET\x00\x01/\x00\x00"),
        ErrorCode.PROTOCOL_ERROR,
    ),
]


def _error_case(section: str, title: str, hello: bool | bytes, bad: bytes, code: ErrorCode) -> None:
    async def run(target: RelayTarget, probe: Probe) -> None:
        async with connected(target, probe, hello=hello) as agent:
            await agent.send(bad)
            await _connection_error(agent, code, transport.CLOSE_PROTOCOL_ERROR)

    suite.case(section, MUST, f"{title}: GOAWAY {code.name}, then Close 1002")(run)


for _section, _title, _hello, _bad, _code in _ERRORS:
    _error_case(_section, _title, _hello, _bad, _code)


@suite.case("7", MUST, "an OPEN from the agent is refused with RESET(REFUSED_STREAM); the connection goes on")
async def _refused_open(target: RelayTarget, probe: Probe) -> None:
    async with connected(target, probe) as agent:
        await agent.send(frame(OPEN, END_STREAM, 1, b"\x03GET\x00\x01/\x00\x00"))
        reset = await agent.wait_for(RESET)
        if (reset.stream_id, reset.error_code) != (1, ErrorCode.REFUSED_STREAM):
            raise Unexpected(f"RESET {reset.error_code.name} on stream {reset.stream_id}")
        await ping(agent)
