"""Cases for a relay: the runner dials it as a scripted agent (and, with an HTTP address, is its client too).

Every case opens its own connection, so a connection error in one cannot hide another's result. The cases
that need the relay's HTTP side expect the runner's agent to be the only one the relay routes to.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import struct
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import trio

from protocol import (
    ErrorCode,
    RequestHead,
    ResponseHead,
    decode_request_head,
    encode_hello,
    encode_response_head,
)

from .. import transport
from .peers import (
    DATA,
    END_STREAM,
    GOAWAY,
    HELLO,
    OPEN,
    PING,
    REPLY,
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


suite: Suite[RelayTarget] = Suite()


@asynccontextmanager
async def _agent(
    target: RelayTarget, probe: Probe, *, hello: bool | bytes = True, url: str | None = None
) -> AsyncIterator[HostileAgent]:
    async with hostile_agent(url or target.url, target.token, hello=hello, timeout=target.timeout) as agent:
        probe.watch(agent)
        yield agent


async def _ping(agent: HostileAgent, data: bytes = b"rtunnel!") -> None:
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
    async with _agent(target, probe, hello=False) as agent:
        first = await agent.next_frame()
        if first is None or first.type != HELLO:
            raise Unexpected("the first frame is not HELLO")


@suite.case("2", SHOULD, "an upgrade on another path is accepted too")
async def _any_path(target: RelayTarget, probe: Probe) -> None:
    parts = urllib.parse.urlsplit(target.url)
    url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/conformance/any/path", "", ""))
    async with _agent(target, probe, url=url) as agent:
        await _ping(agent)


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
    async with _agent(target, probe) as agent:
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
    async with _agent(target, probe, hello=bytes(hello)) as agent:
        await _ping(agent)


@suite.case("4.8", MUST, "a PING is answered with a PING ACK carrying the same 8 octets")
async def _ping_ack(target: RelayTarget, probe: Probe) -> None:
    async with _agent(target, probe) as agent:
        await _ping(agent, bytes(range(1, 9)))


@suite.case("2", MUST, "frames coalesced into one message are all processed, in order")
async def _coalesced(target: RelayTarget, probe: Probe) -> None:
    async with _agent(target, probe) as agent:
        await agent.send(*(frame(PING, 0, 0, struct.pack(">Q", i)) for i in range(3)))
        for i in range(3):
            await _expect_ack(agent, struct.pack(">Q", i))


@suite.case("2", MUST, "a frame split across two messages is accepted")
async def _split(target: RelayTarget, probe: Probe) -> None:
    async with _agent(target, probe) as agent:
        await agent.send_split(frame(PING, 0, 0, b"splitted"), 5)
        await _expect_ack(agent, b"splitted")


@suite.case("2", MUST, "a message of 1 MiB of coalesced frames is accepted")
async def _large_message(target: RelayTarget, probe: Probe) -> None:
    async with _agent(target, probe) as agent:
        await agent.send(*one_mebibyte(frame(PING, 0, 0, b"mebibyte")))
        await _expect_ack(agent, b"mebibyte")


@suite.case("2", MUST, "an empty binary message is ignored")
async def _empty_message(target: RelayTarget, probe: Probe) -> None:
    async with _agent(target, probe) as agent:
        await agent.send(b"")
        await _ping(agent)


@suite.case("3", MUST, "a frame of an unknown type is skipped, and undefined flags are ignored")
async def _unknown_type(target: RelayTarget, probe: Probe) -> None:
    async with _agent(target, probe) as agent:
        await agent.send(frame(0x20, 0xFF, 0, b"future"), frame(PING, 0xFE, 0, b"flagged!"))
        await _expect_ack(agent, b"flagged!")


# -- connection errors ----------------------------------------------------------------------------------


@suite.case("2.1", MUST, "a text message: GOAWAY PROTOCOL_ERROR, then Close 1003")
async def _text(target: RelayTarget, probe: Probe) -> None:
    async with _agent(target, probe) as agent:
        await agent.send_text("hello")
        await _connection_error(agent, ErrorCode.PROTOCOL_ERROR, transport.CLOSE_UNSUPPORTED_DATA)


@suite.case("3.1", MUST, "a frame over the relay's MAX_FRAME_SIZE: GOAWAY FRAME_SIZE_ERROR, then Close 1002")
async def _oversized(target: RelayTarget, probe: Probe) -> None:
    async with _agent(target, probe) as agent:
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
        async with _agent(target, probe, hello=hello) as agent:
            await agent.send(bad)
            await _connection_error(agent, code, transport.CLOSE_PROTOCOL_ERROR)

    suite.case(section, MUST, f"{title}: GOAWAY {code.name}, then Close 1002")(run)


for _section, _title, _hello, _bad, _code in _ERRORS:
    _error_case(_section, _title, _hello, _bad, _code)


@suite.case("7", MUST, "an OPEN from the agent is refused with RESET(REFUSED_STREAM); the connection goes on")
async def _refused_open(target: RelayTarget, probe: Probe) -> None:
    async with _agent(target, probe) as agent:
        await agent.send(frame(OPEN, END_STREAM, 1, b"\x03GET\x00\x01/\x00\x00"))
        reset = await agent.wait_for(RESET)
        if (reset.stream_id, reset.error_code) != (1, ErrorCode.REFUSED_STREAM):
            raise Unexpected(f"RESET {reset.error_code.name} on stream {reset.stream_id}")
        await _ping(agent)


# -- exchanges (need the relay's HTTP side) ----------------------------------------------------------------


@dataclasses.dataclass
class _Answer:
    interim: list[int]
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


async def _client(
    target: RelayTarget,
    probe: Probe,
    method: bytes,
    path: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
    *,
    wait_continue: bool = False,
    http_version: bytes = b"1.1",
) -> _Answer:
    """One HTTP/1.1 request to the relay's HTTP side (a body needs its Content-Length in `headers`)."""
    if target.http_url is None:
        raise Skip("needs --http")
    parts = urllib.parse.urlsplit(target.http_url)
    probe.sent.append(f"HTTP request: {method.decode()} {path.decode()} {headers!r}")
    stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
    conn = h11.Connection(h11.CLIENT)
    answer = _Answer([], 0, [], b"")
    async with stream:
        head = conn.send(h11.Request(method=method, target=path, headers=[(b"Host", b"app"), *headers]))
        if http_version != b"1.1":  # h11 writes 1.1 only; the response parses the same
            head = head.replace(b" HTTP/1.1\r\n", b" HTTP/" + http_version + b"\r\n", 1)
        tail = (conn.send(h11.Data(data=body)) if body else b"") or b""
        tail += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(head if wait_continue else head + tail)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                answer.interim.append(event.status_code)
                if event.status_code == 100 and wait_continue:
                    await stream.send_all(tail)
            elif isinstance(event, h11.Response):
                answer.status, answer.headers = event.status_code, list(event.headers.raw_items())
            elif isinstance(event, h11.Data):
                answer.body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    probe.got.append(
        f"HTTP response: interim {answer.interim}, status {answer.status}, {len(answer.body)} octets"
    )
    return answer


async def _next_open(agent: HostileAgent) -> tuple[Frame, RequestHead]:
    opened = await agent.wait_for(OPEN)
    head = decode_request_head(opened.payload)
    agent.got.append(f"  request head: {head.method!r} {head.target!r} {list(head.headers)!r}")
    return opened, head


def _reply(
    stream_id: int, status: int, headers: tuple[tuple[bytes, bytes], ...] = (), *, end: bool = False
) -> bytes:
    head = encode_response_head(ResponseHead(status, b"", headers))
    return frame(REPLY, END_STREAM if end else 0, stream_id, head)


@asynccontextmanager
async def _exchange(target: RelayTarget, probe: Probe) -> AsyncIterator[tuple[HostileAgent, trio.Nursery]]:
    if target.http_url is None:
        raise Skip("needs --http")
    async with _agent(target, probe) as agent, trio.open_nursery() as nursery:
        await _ping(agent)  # the relay has the agent in its table
        yield agent, nursery


_HOP_HEADERS = [
    (b"Connection", b"X-Hop, keep-alive"),
    (b"X-Hop", b"1"),
    (b"Keep-Alive", b"timeout=5"),
    (b"TE", b"trailers"),
    (b"Proxy-Connection", b"x"),
]


@suite.case(
    "5.4", MUST, "the OPEN: hop-by-hop headers removed, Content-Length kept, Via and X-Forwarded-For added"
)
async def _open_head(target: RelayTarget, probe: Probe) -> None:
    async with _exchange(target, probe) as (agent, nursery):
        answers: list[_Answer] = []

        async def client() -> None:
            headers = [(b"Content-Length", b"5"), *_HOP_HEADERS]
            answers.append(await _client(target, probe, b"POST", b"/conformance/echo?q=1", headers, b"hello"))

        nursery.start_soon(client)
        opened, head = await _next_open(agent)
        names = {name.lower() for name, _ in head.headers}
        bad = names & {
            b"connection",
            b"x-hop",
            b"keep-alive",
            b"te",
            b"proxy-connection",
            b"transfer-encoding",
        }
        if bad:
            raise Unexpected(f"hop-by-hop headers forwarded: {sorted(bad)}")
        for needed in (b"via", b"x-forwarded-for", b"content-length", b"host"):
            if needed not in names:
                raise Unexpected(f"no {needed.decode()} header in the OPEN")
        if (head.method, head.target) != (b"POST", b"/conformance/echo?q=1"):
            raise Unexpected(f"request line {head.method!r} {head.target!r}")
        body = b""
        while not body.endswith(b"hello"):
            got = await agent.wait_for(DATA)
            body += got.payload
        await agent.send(
            _reply(opened.stream_id, 200, ((b"Content-Length", b"2"),)),
            frame(DATA, END_STREAM, opened.stream_id, b"ok"),
        )
    if (answers[0].status, answers[0].body) != (200, b"ok"):
        raise Unexpected(f"the client got {answers[0].status} {answers[0].body!r}")


@suite.case(
    "5.4", MUST, "Expect: 100-continue is forwarded; the agent's 100 reaches the client before its body"
)
async def _continue(target: RelayTarget, probe: Probe) -> None:
    async with _exchange(target, probe) as (agent, nursery):
        answers: list[_Answer] = []

        async def client() -> None:
            headers = [(b"Content-Length", b"5"), (b"Expect", b"100-continue")]
            answers.append(
                await _client(
                    target, probe, b"PUT", b"/conformance/upload", headers, b"hello", wait_continue=True
                )
            )

        nursery.start_soon(client)
        opened, head = await _next_open(agent)
        expect = [value for name, value in head.headers if name.lower() == b"expect"]
        if expect != [b"100-continue"]:
            raise Unexpected(f"Expect in the OPEN: {expect}")
        await agent.send(_reply(opened.stream_id, 100))
        got = await agent.wait_for(DATA)
        await agent.send(_reply(opened.stream_id, 204, end=True))
    if got.payload[:5] != b"hello" or answers[0].interim != [100] or answers[0].status != 204:
        raise Unexpected(f"interim {answers[0].interim}, status {answers[0].status}, body {got.payload!r}")


@suite.case(
    "5.5", MUST, "an HTTP/1.0 request with Upgrade is ordinary: no Upgrade in the OPEN, END_STREAM set"
)
async def _upgrade_http10(target: RelayTarget, probe: Probe) -> None:
    async with _exchange(target, probe) as (agent, nursery):
        answers: list[_Answer] = []

        async def client() -> None:
            headers = [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]
            answers.append(
                await _client(target, probe, b"GET", b"/conformance/ws", headers, http_version=b"1.0")
            )

        nursery.start_soon(client)
        opened, head = await _next_open(agent)
        names = {name.lower() for name, _ in head.headers}
        if b"upgrade" in names or not opened.flags & END_STREAM:
            raise Unexpected(f"forwarded as a protocol switch: flags {opened.flags}, headers {sorted(names)}")
        await agent.send(_reply(opened.stream_id, 204, end=True))
    if answers[0].status != 204:
        raise Unexpected(f"the client got {answers[0].status}")


async def _bad_reply(target: RelayTarget, probe: Probe, reply: bytes) -> None:
    async with _exchange(target, probe) as (agent, nursery):
        answers: list[_Answer] = []

        async def client() -> None:
            answers.append(await _client(target, probe, b"GET", b"/conformance/x", []))

        nursery.start_soon(client)
        opened, _ = await _next_open(agent)
        await agent.send(_restream(reply, opened.stream_id))
        reset = await agent.wait_for(RESET)
        if reset.error_code is not ErrorCode.PROTOCOL_ERROR:
            raise Unexpected(f"RESET {reset.error_code.name}, expected PROTOCOL_ERROR")
    if answers[0].status != 502:
        raise Unexpected(f"the client got {answers[0].status}, expected 502")


def _restream(data: bytes, stream_id: int) -> bytes:
    return data[:5] + u32(stream_id) + data[9:]


@suite.case("4.3", MUST, "an interim REPLY with END_STREAM: RESET(PROTOCOL_ERROR), the client gets 502")
async def _interim_end(target: RelayTarget, probe: Probe) -> None:
    await _bad_reply(target, probe, _reply(0, 103, end=True))


@suite.case(
    "5.5", MUST, "a 101 to a request that did not ask to switch: RESET(PROTOCOL_ERROR), the client gets 502"
)
async def _unasked_101(target: RelayTarget, probe: Probe) -> None:
    await _bad_reply(target, probe, _reply(0, 101, ((b"Upgrade", b"websocket"), (b"Connection", b"upgrade"))))


@suite.case("10.1", MUST, "a stream refused with REFUSED_STREAM is sent again, on another connection")
async def _refused_retry(target: RelayTarget, probe: Probe) -> None:
    async with _exchange(target, probe) as (first, nursery), _agent(target, probe) as second:
        await _ping(second)
        answers: list[_Answer] = []

        async def client() -> None:
            headers = [(b"Content-Length", b"0")]
            answers.append(await _client(target, probe, b"POST", b"/conformance/once", headers))

        nursery.start_soon(client)
        agents = [first, second]
        with trio.fail_after(target.timeout):
            refused = await _first_open(agents)
        await refused[0].send(frame(RESET, 0, refused[1].stream_id, u32(ErrorCode.REFUSED_STREAM)))
        other = second if refused[0] is first else first
        opened, _ = await _next_open(other)
        await other.send(_reply(opened.stream_id, 204, end=True))
    if answers[0].status != 204:
        raise Unexpected(f"the client got {answers[0].status}, expected 204 from the second agent")


async def _first_open(agents: list[HostileAgent]) -> tuple[HostileAgent, Frame]:
    """The agent the relay sent its OPEN to, and that OPEN."""
    found: list[tuple[HostileAgent, Frame]] = []
    async with trio.open_nursery() as nursery:

        async def watch(agent: HostileAgent) -> None:
            opened = await agent.wait_for(OPEN)
            found.append((agent, opened))
            nursery.cancel_scope.cancel()

        for agent in agents:
            nursery.start_soon(watch, agent)
    return found[0]
