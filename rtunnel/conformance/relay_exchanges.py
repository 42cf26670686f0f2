"""Relay cases that need the relay's HTTP side (--http): the runner is the relay's client and its only agent,
and checks what the relay makes of a request (the OPEN) and of what the agent answers.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import trio

from protocol import ErrorCode, RequestHead, ResponseHead, decode_request_head, encode_response_head

from .peers import DATA, END_STREAM, OPEN, REPLY, RESET, Frame, HostileAgent, Unexpected, frame, u32
from .relay_cases import RelayTarget, connected, ping
from .runner import Level, Probe, Skip, Suite

MUST = Level.MUST

suite: Suite[RelayTarget] = Suite()


@dataclasses.dataclass
class _Answer:
    interim: list[int]
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclasses.dataclass(frozen=True)
class _Request:
    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""  # needs its Content-Length in `headers`
    wait_continue: bool = False  # send the body only after a 100
    http_version: bytes = b"1.1"


async def _client(target: RelayTarget, probe: Probe, request: _Request) -> _Answer:
    """One request to the relay's HTTP side, on a connection of its own."""
    method, path, headers, body = request.method, request.path, request.headers, request.body
    wait_continue, http_version = request.wait_continue, request.http_version
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


def _request(nursery: trio.Nursery, target: RelayTarget, probe: Probe, request: _Request) -> list[_Answer]:
    """Start one client request in the background; its answer lands in the list returned."""
    answers: list[_Answer] = []

    async def client() -> None:
        answers.append(await _client(target, probe, request))

    nursery.start_soon(client)
    return answers


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
    async with connected(target, probe) as agent, trio.open_nursery() as nursery:
        await ping(agent)  # the relay has the agent in its table
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
        headers = [(b"Content-Length", b"5"), *_HOP_HEADERS]
        answers = _request(
            nursery, target, probe, _Request(b"POST", b"/conformance/echo?q=1", headers, b"hello")
        )
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
        headers = [(b"Content-Length", b"5"), (b"Expect", b"100-continue")]
        answers = _request(
            nursery,
            target,
            probe,
            _Request(b"PUT", b"/conformance/upload", headers, b"hello", wait_continue=True),
        )
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
        headers = [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]
        answers = _request(
            nursery, target, probe, _Request(b"GET", b"/conformance/ws", headers, http_version=b"1.0")
        )
        opened, head = await _next_open(agent)
        names = {name.lower() for name, _ in head.headers}
        if b"upgrade" in names or not opened.flags & END_STREAM:
            raise Unexpected(f"forwarded as a protocol switch: flags {opened.flags}, headers {sorted(names)}")
        await agent.send(_reply(opened.stream_id, 204, end=True))
    if answers[0].status != 204:
        raise Unexpected(f"the client got {answers[0].status}")


async def _bad_reply(target: RelayTarget, probe: Probe, reply: bytes) -> None:
    async with _exchange(target, probe) as (agent, nursery):
        answers = _request(nursery, target, probe, _Request(b"GET", b"/conformance/x", []))
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
    async with _exchange(target, probe) as (first, nursery), connected(target, probe) as second:
        await ping(second)
        headers = [(b"Content-Length", b"0")]
        answers = _request(nursery, target, probe, _Request(b"POST", b"/conformance/once", headers))
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
