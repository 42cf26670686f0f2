"""Cases for an agent: the runner is its relay (a scripted one) and its upstream (a scripted HTTP server), and
starts the agent's command against them, with {url}, {token} and {upstream} filled in.

The agent must forward every request to {upstream} (no allow rules). Cases share the agent's connection
while it lasts; a case that ends it with a connection error waits for the agent to dial again, so the agent
should reconnect quickly (e.g. `rtunnel dial --backoff-initial 0.05`).
"""

from __future__ import annotations

import dataclasses
import subprocess
import tempfile
from collections.abc import Sequence
from typing import IO

import trio
import trio.lowlevel

from protocol import ErrorCode, PingAcknowledged, ReplyReceived, RequestHead, encode_request_head

from ..link import transport
from .peers import (
    END_STREAM,
    GOAWAY,
    OPEN,
    PING,
    HostileLink,
    HostileRelay,
    Unexpected,
    frame,
    hostile_relay,
    one_mebibyte,
    u32,
)
from .runner import Level, Outcome, Probe, Suite

MUST, SHOULD = Level.MUST, Level.SHOULD


@dataclasses.dataclass(frozen=True)
class AgentTarget:
    command: Sequence[str]
    token: str = "conformance-token"
    timeout: float = 5.0


# -- the scripted upstream ------------------------------------------------------------------------------

_HOP = (
    b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
    b"Proxy-Connection: keep-alive\r\nX-Kept: yes\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
)
_LONG_REASON = b"R" * 300
_REASON = b"HTTP/1.1 200 " + _LONG_REASON + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class Upstream:
    """An HTTP/1.1 server that records every request head it receives and answers by path."""

    def __init__(self) -> None:
        self.address = ""
        self.heads: list[bytes] = []
        self.scope = trio.CancelScope()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            host, port = listeners[0].socket.getsockname()[:2]
            self.address = f"http://{host}:{port}"
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = await _receive(stream)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        self.heads.append(head)
        target = [*head.split(b"\r\n", 1)[0].split(b" "), b"", b""][1]
        if target.endswith(b"/hop"):
            answer = _HOP
        elif target.endswith(b"/reason"):
            answer = _REASON
        elif target.endswith(b"/continue"):
            if b"\r\nexpect: 100-continue" in head.lower():
                await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            while len(body) < 5:
                chunk = await _receive(stream)
                if not chunk:
                    return
                body += chunk
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
                len(body),
                body,
            )
        else:
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
                len(head),
                head,
            )
        try:
            await stream.send_all(answer)
        except trio.BrokenResourceError:
            return


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(65536)
    except trio.BrokenResourceError:
        return b""


# -- the session: one agent process, its connections ----------------------------------------------------


class Session:
    """What the cases share: the scripted relay and upstream, and the agent's current connection."""

    def __init__(self, target: AgentTarget, relay: HostileRelay, upstream: Upstream) -> None:
        self.target = target
        self.relay = relay
        self.upstream = upstream
        self.link: HostileLink | None = None
        self.exit_status: int | None = None  # the agent's, once it exited
        self._accepting: trio.CancelScope | None = None

    async def connection(self, probe: Probe) -> HostileLink:
        """The agent's connection; a new one (the agent reconnects) if a case ended the last one. Our HELLO
        always carries a non-zero reserved field, which the agent must ignore (SPEC 4.1)."""
        if self.link is None or self.link.closed:
            with trio.CancelScope() as self._accepting:
                if self.exit_status is None:
                    self.link = await self.relay.accept(reserved=0xABCD)
            self._accepting = None
            if self.link is None or self.link.closed:
                raise Unexpected(f"the agent exited with status {self.exit_status} instead of connecting")
        probe.watch(self.link)
        return self.link

    async def watch_process(self, process: trio.Process) -> None:
        """Once the agent exits, cases waiting for it to connect fail at once instead of timing out."""
        self.exit_status = await process.wait()
        if self._accepting is not None:
            self._accepting.cancel()

    def lost(self) -> None:
        """The case ended the connection (or should have)."""
        if self.link is not None:
            HostileRelay.release(self.link)
        self.link = None


suite: Suite[Session] = Suite()


async def _ping(link: HostileLink, data: bytes = b"rtunnel!") -> None:
    await link.inject(frame(PING, 0, 0, data))
    await _expect_ack(link, data)


async def _expect_ack(link: HostileLink, data: bytes) -> None:
    while True:
        if link.closed:
            raise Unexpected("the agent closed the connection instead of answering the PING")
        for event in link.events:
            if isinstance(event, PingAcknowledged) and event.data == data:
                link.events.remove(event)
                return
        await link._pump()


async def _connection_error(session: Session, link: HostileLink, code: ErrorCode, close_code: int) -> None:
    try:
        got = await link.goaway_code()
        if got is not code:
            raise Unexpected(f"GOAWAY {got.name}, expected {code.name}")
        close = await link.wait_closed()
        if close is None:
            raise Unexpected(f"no WebSocket Close after the GOAWAY (expected {close_code})")
        if close[0] != close_code:
            raise Unexpected(f"WebSocket Close {close[0]}, expected {close_code}")
    finally:
        session.lost()


async def _answer(link: HostileLink, stream_id: int) -> tuple[int, bytes]:
    status, _, body = await link.full_response(stream_id)
    link.got.append(f"  response on stream {stream_id}: {status}, {len(body)} octets")
    return status, body


@suite.case("2", MUST, "the agent dials with subprotocol rtunnel.v1 and Authorization: Bearer <token>")
async def _dials(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    token = link.upgrade.token
    probe.got.append(f"upgrade request token: {token!r}")
    if token != session.target.token.encode():
        raise Unexpected(f"token {token!r}, expected {session.target.token!r}")


@suite.case("4.1", MUST, "the agent's HELLO comes first; a HELLO with a non-zero reserved field is accepted")
async def _hello(session: Session, probe: Probe) -> None:
    await _ping(await session.connection(probe))


@suite.case("4.8", MUST, "a PING is answered with a PING ACK carrying the same 8 octets")
async def _ping_ack(session: Session, probe: Probe) -> None:
    await _ping(await session.connection(probe), bytes(range(8, 0, -1)))


@suite.case("3", MUST, "a frame of an unknown type is skipped, and undefined flags are ignored")
async def _unknown(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    await link.inject(frame(0x20, 0xFF, 0, b"future"))
    await _ping(link)


@suite.case("2", MUST, "a message of 1 MiB of coalesced frames is accepted")
async def _large_message(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    await link.flush()  # so the message is exactly 1 MiB
    await link.inject(*one_mebibyte(frame(PING, 0, 0, b"mebibyte")))
    await _expect_ack(link, b"mebibyte")


@suite.case("5.4", MUST, "a request reaches the upstream and its response comes back on the stream")
async def _forwarded(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    status, body = await _answer(link, await link.open(b"GET", b"/conformance/echo"))
    if status != 200 or not body.startswith(b"GET /conformance/echo HTTP/1.1\r\n"):
        raise Unexpected(f"status {status}, upstream saw {body[:80]!r}")


@suite.case("2", MUST, "a frame split across two messages is accepted")
async def _split(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    stream_id = link.conn.open_stream(
        RequestHead(b"GET", b"/conformance/split", ((b"Host", b"app"),)), end_stream=True
    )
    await link.send_split(link.conn.data_to_send(), 12)
    status, body = await _answer(link, stream_id)
    if status != 200 or not body.startswith(b"GET /conformance/split "):
        raise Unexpected(f"status {status}, upstream saw {body[:80]!r}")


@suite.case("5.4.1", MUST, "raw non-ASCII octets in the path are percent-encoded")
async def _non_ascii(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    status, body = await _answer(link, await link.open(b"GET", b"/conformance/caf\xc3\xa9?q=caf%C3%A9"))
    if status != 200 or not body.startswith(b"GET /conformance/caf%C3%A9?q=caf%C3%A9 HTTP/1.1\r\n"):
        raise Unexpected(f"status {status}, upstream saw {body[:80]!r}")


@suite.case(
    "5.4.1", MUST, "the target is normalized before it is forwarded: /a//../b reaches the upstream as /b"
)
async def _normalized(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    status, body = await _answer(link, await link.open(b"GET", b"/conformance/a//../%62?x=/../y"))
    if status != 200 or not body.startswith(b"GET /conformance/b?x=/../y HTTP/1.1\r\n"):
        raise Unexpected(f"status {status}, upstream saw {body[:80]!r}")


_REFUSED: list[tuple[str, str, bytes, bytes, tuple[tuple[bytes, bytes], ...], bytes]] = [
    ("5.4.1", "an encoded slash in the path", b"GET", b"/conformance/a%2Fb", (), b"app"),
    ("5.4.1", "a .. above the root", b"GET", b"/../etc/passwd", (), b"app"),
    ("5.4.2", "a space in the target", b"GET", b"/conformance/a b", (), b"app"),
    ("5.4.2", "a space in the method", b"GET /x", b"/conformance/x", (), b"app"),
    (
        "5.4.2",
        "CR LF in a header value",
        b"GET",
        b"/conformance/x",
        ((b"X-A", b"1\r\nX-Injected: 1"),),
        b"app",
    ),
    ("5.4.2", "NUL in a header value", b"GET", b"/conformance/x", ((b"X-A", b"1\x00"),), b"app"),
    ("5.4.2", "a space in a header name", b"GET", b"/conformance/x", ((b"X Bad", b"1"),), b"app"),
    ("5.4.2", "CR LF in a header name", b"GET", b"/conformance/x", ((b"X-A\r\nX-B", b"1"),), b"app"),
    ("5.4.1", "a raw non-ASCII octet in the query", b"GET", b"/conformance/x?q=caf\xc3\xa9", (), b"app"),
    ("5.4.1", "two Host headers", b"GET", b"/conformance/x", ((b"Host", b"other"),), b"app"),
    ("5.4.1", "a Host with a path", b"GET", b"/conformance/x", (), b"app/admin"),
    ("5.4.1", "an empty Host", b"GET", b"/conformance/x", (), b""),
]


def _refusal_case(
    section: str,
    title: str,
    method: bytes,
    target: bytes,
    headers: tuple[tuple[bytes, bytes], ...],
    host: bytes,
) -> None:
    async def run(session: Session, probe: Probe) -> None:
        link = await session.connection(probe)
        before = len(session.upstream.heads)
        status, _ = await _answer(link, await link.open(method, target, headers, host=host))
        if status != 400:
            raise Unexpected(f"status {status}, expected 400")
        if len(session.upstream.heads) != before:
            raise Unexpected(f"forwarded anyway: the upstream saw {session.upstream.heads[-1][:120]!r}")

    suite.case(section, MUST, f"{title}: 400 from the agent, nothing forwarded")(run)


for _refusal in _REFUSED:
    _refusal_case(*_refusal)


@suite.case("5.4.1", MUST, "a request without Host gets one naming the upstream")
async def _host(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    status, body = await _answer(link, await link.open(b"GET", b"/conformance/no-host", host=None))
    authority = session.upstream.address.removeprefix("http://").encode()
    hosts = [line for line in body.lower().split(b"\r\n") if line.startswith(b"host:")]
    if status != 200 or hosts != [b"host: " + authority]:
        raise Unexpected(f"status {status}, the upstream saw Host lines {hosts}")


@suite.case("5.4", MUST, "the upstream's hop-by-hop and framing headers are removed from the REPLY")
async def _hop(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    status, replies, body = await link.full_response(await link.open(b"GET", b"/conformance/hop"))
    names = {name.lower() for name, _ in replies[-1].head.headers} if replies else set()
    link.got.append(f"  REPLY headers: {sorted(names)}")
    bad = names & {b"connection", b"x-hop", b"keep-alive", b"proxy-connection", b"transfer-encoding"}
    if status != 200 or body != b"hello" or bad or b"x-kept" not in names:
        raise Unexpected(f"status {status}, body {body!r}, forwarded {sorted(bad)}")


@suite.case("5.2", MUST, "a reason phrase longer than 255 octets is truncated to 255")
async def _reason(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    status, replies, body = await link.full_response(await link.open(b"GET", b"/conformance/reason"))
    reason = replies[-1].head.reason if replies else b""
    if (status, body, reason) != (200, b"ok", _LONG_REASON[:255]):
        raise Unexpected(f"status {status}, reason of {len(reason)} octets, body {body!r}")


@suite.case(
    "5.4", MUST, "Expect: 100-continue: the upstream's 100 comes back as an interim REPLY before the body"
)
async def _continue(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    headers = ((b"Content-Length", b"5"), (b"Expect", b"100-continue"))
    stream_id = await link.open(b"PUT", b"/conformance/continue", headers, end_stream=False)
    interim = await link.wait_event(ReplyReceived, stream_id)
    assert isinstance(interim, ReplyReceived)
    if interim.head.status != 100:
        raise Unexpected(f"first REPLY {interim.head.status}, expected an interim 100")
    link.conn.send_data(stream_id, b"hello", end_stream=True)
    await link.flush()
    status, body = await _answer(link, stream_id)
    if (status, body) != (200, b"hello"):
        raise Unexpected(f"status {status}, body {body!r}")


@suite.case("2.1", MUST, "a text message: GOAWAY PROTOCOL_ERROR, then Close 1003")
async def _text(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    await link.send_text("hello")
    await _connection_error(session, link, ErrorCode.PROTOCOL_ERROR, transport.CLOSE_UNSUPPORTED_DATA)


@suite.case("4.9", MUST, "a GOAWAY payload shorter than 8 octets: GOAWAY FRAME_SIZE_ERROR, then Close 1002")
async def _short_goaway(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    await link.inject(frame(GOAWAY, 0, 0, u32(0)))
    await _connection_error(session, link, ErrorCode.FRAME_SIZE_ERROR, transport.CLOSE_PROTOCOL_ERROR)


@suite.case("6", MUST, "an OPEN with the dialer's (odd) parity: GOAWAY PROTOCOL_ERROR, then Close 1002")
async def _odd_open(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    head = encode_request_head(RequestHead(b"GET", b"/", ((b"Host", b"app"),)))
    await link.inject(frame(OPEN, END_STREAM, 1, head))
    await _connection_error(session, link, ErrorCode.PROTOCOL_ERROR, transport.CLOSE_PROTOCOL_ERROR)


@suite.case("3.1", MUST, "a frame over the agent's MAX_FRAME_SIZE: GOAWAY FRAME_SIZE_ERROR, then Close 1002")
async def _oversized(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    settings = link.conn.peer_settings
    limit = settings.max_frame_size if settings is not None else 16384
    await link.inject(frame(0x20, 0, 0, bytes(limit + 1)))
    await _connection_error(session, link, ErrorCode.FRAME_SIZE_ERROR, transport.CLOSE_PROTOCOL_ERROR)


@suite.case("5.4", MUST, "the upstream refuses connections: REPLY 502 from the agent")
async def _unreachable(session: Session, probe: Probe) -> None:
    link = await session.connection(probe)
    session.upstream.scope.cancel()  # closes the listener: the port now refuses connections
    await trio.lowlevel.checkpoint()
    status, _ = await _answer(link, await link.open(b"GET", b"/conformance/gone"))
    if status != 502:
        raise Unexpected(f"status {status}, expected 502")


# -- running ---------------------------------------------------------------------------------------------


async def run_agent_suite(target: AgentTarget, *, only: str | None = None) -> list[Outcome]:
    upstream = Upstream()
    with tempfile.TemporaryFile() as log:
        async with hostile_relay(target.timeout) as relay, trio.open_nursery() as nursery:
            await nursery.start(upstream.serve)
            command = [
                part.replace("{url}", relay.url)
                .replace("{token}", target.token)
                .replace("{upstream}", upstream.address)
                for part in target.command
            ]
            session = Session(target, relay, upstream)
            process = await _start(command, log)
            nursery.start_soon(session.watch_process, process)
            try:
                outcomes = await suite.run(session, timeout=target.timeout * 3, only=only)
            finally:
                session.lost()  # a draining agent waits for its relay to close the connection
                with trio.CancelScope(shield=True):  # interrupted or not, never leave the agent running
                    await _stop(process)
                nursery.cancel_scope.cancel()
        if not any(outcome.passed for outcome in outcomes):
            log.seek(0)
            tail = log.read()[-2000:].decode("utf-8", "replace")
            print(f"the agent's output ended with:\n{tail}")
    return outcomes


class StartFailed(Exception):
    """The agent's command could not be started; str() says why, in one line."""


async def _start(command: list[str], log: IO[bytes]) -> trio.Process:
    try:
        return await trio.lowlevel.open_process(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    except OSError as exc:
        raise StartFailed(f"cannot start {command[0]!r}: {exc.strerror or exc}") from None


async def _stop(process: trio.Process) -> None:
    if process.returncode is None:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
