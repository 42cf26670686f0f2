"""Tests for rtunnel.transport over real loopback sockets (127.0.0.1, port 0)."""

from __future__ import annotations

import contextlib
import hmac
import importlib
import logging
import os
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from types import ModuleType

import pytest
import trio
import trio.testing
import trio_websocket
import trustme
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI

from rtunnel.limits import AuthThrottle
from rtunnel.transport import SUBPROTOCOL, Transport, parse_relay_url

# Every test takes the module under test from the `tr` fixture, so that a candidate replacement
# (same names, same behaviour) can run this suite side by side with the current one; that is how
# the move from trio-websocket to the websockets sans-IO core was checked (bench/transport_bench.py).
IMPLEMENTATIONS = ["rtunnel.transport"]

TOKEN = "s3cret-token"
AUTH_HEADER = [(b"Authorization", b"Bearer " + TOKEN.encode())]


def _authenticate(token: bytes | None) -> bool:
    return token is not None and hmac.compare_digest(token, TOKEN.encode())


@pytest.fixture(params=IMPLEMENTATIONS)
def tr(request: pytest.FixtureRequest) -> ModuleType:
    """The transport module under test."""
    return importlib.import_module(request.param)


def _impl(t: Transport) -> ModuleType:
    """The module a Transport comes from (for handlers, which get no fixtures)."""
    return sys.modules[type(t).__module__]


async def _start_relay(
    tr: ModuleType,
    nursery: trio.Nursery,
    handler: Callable[[Transport], Awaitable[None]],
    scheme: str = "ws",
    **kwargs: object,
) -> str:
    host, port = await nursery.start(
        partial(tr.serve, handler, "127.0.0.1", 0, authenticate=_authenticate, **kwargs)
    )
    return f"{scheme}://{host}:{port}/agent"


async def _echo(t: Transport) -> None:
    with contextlib.suppress(_impl(t).TransportClosed):
        while True:
            await t.send(await t.receive())


@pytest.fixture
async def echo_url(tr: ModuleType, nursery: trio.Nursery) -> str:
    return await _start_relay(tr, nursery, _echo)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def _raw_rejection(
    url: str, *, subprotocols: list[str], extra_headers: list[tuple[bytes, bytes]]
) -> trio_websocket.ConnectionRejected:
    """Probe our relay with plain trio-websocket and return its rejection. We open the socket
    ourselves: trio-websocket's own client leaks it when the upgrade is rejected."""
    _, host, port, path = parse_relay_url(url)
    rejections: list[trio_websocket.ConnectionRejected] = []
    async with await trio.open_tcp_stream(host, port) as stream:
        try:
            async with trio.open_nursery() as nursery:
                await trio_websocket.wrap_client_stream(
                    nursery, stream, host, path, subprotocols=subprotocols, extra_headers=extra_headers
                )
        except* trio_websocket.ConnectionRejected as group:
            rejections.extend(group.exceptions)  # type: ignore[arg-type]
    assert len(rejections) == 1
    return rejections[0]


def _free_port() -> int:
    """A port with nothing listening (bound then closed; nothing else binds 127.0.0.1 here)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------------------------
# parse_relay_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://relay:8080", ("ws", "relay", 8080, "/")),
        ("wss://relay.example/agent", ("wss", "relay.example", 443, "/agent")),
        ("ws://127.0.0.1/a?b=c", ("ws", "127.0.0.1", 80, "/a?b=c")),
        ("WSS://[::1]:9/", ("wss", "::1", 9, "/")),
    ],
)
def test_parse_relay_url_ok(url: str, expected: tuple[str, str, int, str]) -> None:
    assert parse_relay_url(url) == expected


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://relay:80", "ws:// or wss://"),
        ("relay:80", "ws:// or wss://"),
        ("ws://:80/", "no host"),
        ("ws://relay:99999/", "invalid port"),
        ("ws://relay:0/", "invalid port"),
        ("ws://relay:x/", "invalid port"),
        ("ws://user:pw@relay/", "credentials"),
        ("ws://relay/#frag", "fragment"),
        ("ws://relay/a b", "printable ASCII"),
    ],
)
def test_parse_relay_url_bad(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        parse_relay_url(url)
    assert "\n" not in str(info.value)


def test_bearer_token_extraction(tr: ModuleType) -> None:
    bearer = tr._bearer_token
    assert bearer([(b"authorization", b"Bearer abc")]) == b"abc"
    assert bearer([(b"authorization", b"bearer  abc ")]) == b"abc"
    assert bearer([]) is None
    assert bearer([(b"authorization", b"Basic abc")]) is None
    assert bearer([(b"authorization", b"Bearer")]) is None
    assert bearer([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer a")]) is None


# --------------------------------------------------------------------------------------------
# happy path


async def test_echo_binary_messages(tr: ModuleType, echo_url: str) -> None:
    big = os.urandom(1024 * 1024)
    async with tr.connect(echo_url, token=TOKEN, ssl_context=None) as t:
        assert t.remote.startswith("127.0.0.1:")
        for message in (b"", b"x", big):
            await t.send(message)
            assert await t.receive() == message
        await t.send(bytearray(b"abc"))
        assert await t.receive() == b"abc"
        await t.send(memoryview(big)[10:20])
        assert await t.receive() == big[10:20]
    assert t.closed
    with pytest.raises(tr.TransportClosed, match="closed locally"):
        await t.receive()


async def test_error_in_block_propagates_unwrapped(tr: ModuleType, echo_url: str) -> None:
    with pytest.raises(KeyError):
        async with tr.connect(echo_url, token=TOKEN, ssl_context=None):
            raise KeyError("mine")


async def test_cancel_in_block_is_clean(tr: ModuleType, echo_url: str) -> None:
    with trio.CancelScope() as scope:
        async with tr.connect(echo_url, token=TOKEN, ssl_context=None) as t:
            scope.cancel()
            await t.receive()
    assert scope.cancelled_caught


# --------------------------------------------------------------------------------------------
# refusals


async def test_wrong_or_missing_token_is_auth_rejected(tr: ModuleType, echo_url: str) -> None:
    with pytest.raises(tr.AuthRejected, match="401 Unauthorized") as info:
        async with tr.connect(echo_url, token="wrong", ssl_context=None):
            pytest.fail("connected with a wrong token")
    assert "check the token" in str(info.value)
    assert isinstance(info.value, tr.ConnectError)
    with pytest.raises(tr.AuthRejected, match="no token was given"):
        async with tr.connect(echo_url, token=None, ssl_context=None):
            pytest.fail("connected without a token")


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"Authorization", b"Basic " + TOKEN.encode())],
        AUTH_HEADER + AUTH_HEADER,  # repeated: refused even though each copy is right
    ],
)
async def test_relay_answers_401_with_bearer_challenge(
    echo_url: str, headers: list[tuple[bytes, bytes]]
) -> None:
    rejection = await _raw_rejection(echo_url, subprotocols=[SUBPROTOCOL], extra_headers=headers)
    assert rejection.status_code == 401
    assert (b"www-authenticate", b"Bearer") in rejection.headers


async def test_relay_answers_426_without_subprotocol(echo_url: str) -> None:
    rejection = await _raw_rejection(echo_url, subprotocols=[], extra_headers=AUTH_HEADER)
    assert rejection.status_code == 426
    assert SUBPROTOCOL.encode() in (rejection.body or b"")


async def test_client_reports_version_mismatch_when_nothing_selected(
    tr: ModuleType,
    nursery: trio.Nursery,
) -> None:
    closed = trio.Event()

    async def plain_handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()  # selects no subprotocol
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await ws.get_message()
        closed.set()

    server = await nursery.start(partial(trio_websocket.serve_websocket, plain_handler, "127.0.0.1", 0, None))
    url = f"ws://127.0.0.1:{server.port}/"
    with pytest.raises(tr.VersionMismatch, match=r"did not select subprotocol rtunnel\.v1"):
        async with tr.connect(url, token=TOKEN, ssl_context=None):
            pytest.fail("accepted a relay that selected no subprotocol")
    await closed.wait()  # we closed the WebSocket, as the spec requires


async def test_client_reports_version_mismatch_on_426(tr: ModuleType, nursery: trio.Nursery) -> None:
    async def reject_handler(request: trio_websocket.WebSocketRequest) -> None:
        await request.reject(426, body=b"rtunnel.v2 only\n")

    server = await nursery.start(
        partial(trio_websocket.serve_websocket, reject_handler, "127.0.0.1", 0, None)
    )
    with pytest.raises(tr.VersionMismatch, match=r"426 Upgrade Required: rtunnel\.v2 only"):
        async with tr.connect(f"ws://127.0.0.1:{server.port}/", token=TOKEN, ssl_context=None):
            pass


async def test_refused_port(tr: ModuleType) -> None:
    with pytest.raises(tr.ConnectError, match="connection refused"):
        async with tr.connect(f"ws://127.0.0.1:{_free_port()}/", token=TOKEN, ssl_context=None):
            pass


async def test_client_handshake_timeout(
    tr: ModuleType, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # A listener that never accepts: the kernel completes the TCP handshake, nobody answers.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(tr.ConnectError, match=r"timed out after 10 s") as info:
        async with tr.connect(f"ws://127.0.0.1:{port}/", token=TOKEN, ssl_context=None):
            pass
    assert "\n" not in str(info.value)
    for listener in listeners:
        await listener.aclose()


async def test_server_drops_silent_client_after_handshake_timeout(
    tr: ModuleType, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    url = await _start_relay(tr, nursery, _echo, handshake_timeout=10)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    start = trio.current_time()
    assert await stream.receive_some() == b""  # EOF, no response
    assert trio.current_time() - start >= 10  # virtual time: the timeout, not something else
    await stream.aclose()


async def test_client_reports_eof_during_handshake(
    tr: ModuleType, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some()

    listeners = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    # trio-websocket alone reports this as a timeout; the virtual clock makes that instant.
    with pytest.raises(tr.ConnectError, match="connection closed during the WebSocket handshake"):
        async with tr.connect(f"ws://127.0.0.1:{port}/", token=TOKEN, ssl_context=None):
            pass


async def test_cancel_during_handshake_is_clean(
    tr: ModuleType, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")  # never answers
    port = listeners[0].socket.getsockname()[1]
    with trio.move_on_after(1) as scope:
        async with tr.connect(f"ws://127.0.0.1:{port}/", token=TOKEN, ssl_context=None):
            pytest.fail("connected to a silent listener")
    assert scope.cancelled_caught
    for listener in listeners:
        await listener.aclose()


async def test_client_with_bad_url_or_token_raises_value_error(tr: ModuleType, echo_url: str) -> None:
    with pytest.raises(ValueError, match="ws:// or wss://"):
        async with tr.connect("http://x/", token=TOKEN, ssl_context=None):
            pass
    with pytest.raises(ValueError, match="token"):
        async with tr.connect(echo_url, token="a\nb", ssl_context=None):
            pass
    with pytest.raises(ValueError, match="SSL context"):
        async with tr.connect(echo_url, token=TOKEN, ssl_context=ssl.create_default_context()):
            pass


# --------------------------------------------------------------------------------------------
# TLS


async def test_wss_with_private_ca(
    tr: ModuleType, nursery: trio.Nursery, server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    url = await _start_relay(tr, nursery, _echo, scheme="wss", ssl_context=server_ssl)
    # Without the CA first: must say why, not time out (trio-websocket alone would hang).
    with pytest.raises(tr.ConnectError, match="certificate verify failed") as info:
        async with tr.connect(url, token=TOKEN, ssl_context=None, connect_timeout=3600):
            pass
    assert "timed out" not in str(info.value)
    # The failed handshake did not hurt the relay.
    async with tr.connect(url, token=TOKEN, ssl_context=client_ssl) as t:
        for message in (b"", b"tls", os.urandom(300_000)):
            await t.send(message)
            assert await t.receive() == message


async def test_relay_reports_tls_failure_without_waiting_for_the_timeout(
    tr: ModuleType, nursery: trio.Nursery, server_ssl: ssl.SSLContext
) -> None:
    seen = trio.Event()
    messages: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("handshake from"):
                messages.append(record.getMessage())
                seen.set()

    handler = Catch()
    logger = logging.getLogger("rtunnel.transport")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        url = await _start_relay(
            tr, nursery, _echo, scheme="wss", ssl_context=server_ssl, handshake_timeout=3600
        )
        with pytest.raises(tr.ConnectError, match="certificate verify failed"):
            async with tr.connect(url, token=TOKEN, ssl_context=None):
                pass
        await seen.wait()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    # TLS 1.3: the client gives up after the server's flight, so the relay may see only an EOF.
    assert "timed out" not in messages[0]
    assert "failed:" in messages[0]


async def test_wss_wrong_token_is_auth_rejected(
    tr: ModuleType, nursery: trio.Nursery, server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    url = await _start_relay(tr, nursery, _echo, scheme="wss", ssl_context=server_ssl)
    with pytest.raises(tr.AuthRejected):
        async with tr.connect(url, token="nope", ssl_context=client_ssl):
            pass


# --------------------------------------------------------------------------------------------
# failures on an established link


async def test_handler_exception_does_not_kill_server(
    tr: ModuleType, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def flaky(t: Transport) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("boom")
        await _echo(t)

    url = await _start_relay(tr, nursery, flaky)
    with caplog.at_level(logging.ERROR, logger="rtunnel.transport"):
        async with tr.connect(url, token=TOKEN, ssl_context=None) as t:
            with pytest.raises(tr.TransportClosed, match="connection lost"):
                await t.receive()
    assert any("failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert TOKEN not in caplog.text
    async with tr.connect(url, token=TOKEN, ssl_context=None) as t:
        await t.send(b"still alive")
        assert await t.receive() == b"still alive"


async def test_block_exit_closes_gracefully_or_aborts(tr: ModuleType, nursery: trio.Nursery) -> None:
    reasons: list[str] = []
    ended = trio.Semaphore(0)

    async def handler(t: Transport) -> None:
        try:
            await t.receive()
        except tr.TransportClosed as exc:
            reasons.append(exc.reason)
        ended.release()

    url = await _start_relay(tr, nursery, handler)
    async with tr.connect(url, token=TOKEN, ssl_context=None):
        pass
    await ended.acquire()
    with pytest.raises(RuntimeError):
        async with tr.connect(url, token=TOKEN, ssl_context=None):
            raise RuntimeError("agent bug")
    await ended.acquire()
    assert reasons[0] == "WebSocket closed: 1000 NORMAL_CLOSURE"
    assert reasons[1].startswith("connection lost")


async def test_abort_is_seen_by_the_peer(tr: ModuleType, nursery: trio.Nursery) -> None:
    server_side: list[str] = []
    done = trio.Event()

    async def handler(t: Transport) -> None:
        try:
            await t.receive()
        except tr.TransportClosed as exc:
            server_side.append(exc.reason)
        done.set()

    url = await _start_relay(tr, nursery, handler)
    async with tr.connect(url, token=TOKEN, ssl_context=None) as t:
        t.abort()
        t.abort()  # idempotent
        with pytest.raises(tr.TransportClosed, match="aborted locally"):
            await t.receive()
        with pytest.raises(tr.TransportClosed, match="aborted locally"):
            await t.send(b"x")
    await done.wait()
    assert server_side and server_side[0].startswith("connection lost")


async def test_server_abort_is_seen_by_the_client(tr: ModuleType, nursery: trio.Nursery) -> None:
    async def handler(t: Transport) -> None:
        t.abort()

    url = await _start_relay(tr, nursery, handler)
    async with tr.connect(url, token=TOKEN, ssl_context=None) as t:
        with pytest.raises(tr.TransportClosed, match="connection lost") as info:
            await t.receive()
        assert "\n" not in info.value.reason


async def test_abort_unblocks_a_send_stuck_on_a_peer_that_does_not_read(
    tr: ModuleType,
    nursery: trio.Nursery,
) -> None:
    release = trio.Event()

    async def not_reading(t: Transport) -> None:
        await release.wait()

    url = await _start_relay(tr, nursery, not_reading)
    outcome: list[str] = []
    async with tr.connect(url, token=TOKEN, ssl_context=None) as t:

        async def flood() -> None:
            chunk = bytes(256 * 1024)
            try:
                while True:
                    await t.send(chunk)
            except tr.TransportClosed as exc:
                outcome.append(exc.reason)

        async with trio.open_nursery() as inner:
            inner.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            t.abort()
    release.set()
    assert outcome == ["aborted locally"]


async def test_cancelled_send_poisons_the_link(tr: ModuleType, nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def not_reading(t: Transport) -> None:
        await release.wait()

    url = await _start_relay(tr, nursery, not_reading)
    async with tr.connect(url, token=TOKEN, ssl_context=None) as t:
        with trio.CancelScope() as scope:

            async def cancel_when_stuck() -> None:
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                scope.cancel()

            async with trio.open_nursery() as inner:
                inner.start_soon(cancel_when_stuck)
                while True:
                    await t.send(bytes(256 * 1024))
        assert t.closed  # at once, before any further I/O
        with pytest.raises(tr.TransportClosed, match="interrupted partway"):
            await t.send(b"x")
    release.set()


async def test_text_message_closes_the_link(tr: ModuleType, nursery: trio.Nursery) -> None:
    reasons: list[str] = []
    done = trio.Event()

    async def handler(t: Transport) -> None:
        try:
            await t.receive()
        except tr.TransportClosed as exc:
            reasons.append(exc.reason)
        done.set()

    url = await _start_relay(tr, nursery, handler)
    _, host, port, path = parse_relay_url(url)
    # Our own socket: trio-websocket's client does not close it after a close from the peer.
    async with await trio.open_tcp_stream(host, port) as stream, trio.open_nursery() as inner:
        ws = await trio_websocket.wrap_client_stream(
            inner, stream, host, path, subprotocols=[SUBPROTOCOL], extra_headers=AUTH_HEADER
        )
        await ws.send_message("hello")
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == 1003
        await ws.aclose()
    await done.wait()
    assert reasons and "text message" in reasons[0]


async def test_message_over_limit_closes_with_1009(tr: ModuleType, nursery: trio.Nursery) -> None:
    async def big_sender(t: Transport) -> None:
        with contextlib.suppress(tr.TransportClosed):
            await t.send(bytes(4096))
            await t.receive()

    url = await _start_relay(tr, nursery, big_sender)
    async with tr.connect(url, token=TOKEN, ssl_context=None, max_message_size=1024) as t:
        with pytest.raises(tr.TransportClosed, match="1009"):
            await t.receive()


# --------------------------------------------------------------------------------------------
# third-party peers: pings and fragmented messages (a sans-IO websockets client as the peer)


async def _sansio_client(url: str) -> tuple[trio.SocketStream, ClientProtocol]:
    """An independent WebSocket client: our own socket, the websockets sans-IO core, no library loop."""
    _, host, port, path = parse_relay_url(url)
    stream = await trio.open_tcp_stream(host, port)
    proto = ClientProtocol(WebSocketURI(False, host, port, path, ""), subprotocols=[Subprotocol(SUBPROTOCOL)])
    request = proto.connect()
    request.headers["Authorization"] = "Bearer " + TOKEN
    proto.send_request(request)
    await stream.send_all(b"".join(proto.data_to_send()))
    while not proto.events_received():
        proto.receive_data(await stream.receive_some())
    assert proto.handshake_exc is None
    return stream, proto


async def _frames_until(stream: trio.SocketStream, proto: ClientProtocol, opcode: Opcode) -> list[Frame]:
    frames: list[Frame] = []
    while not any(f.opcode is opcode for f in frames):
        data = await stream.receive_some()
        assert data, "EOF before the expected frame"
        proto.receive_data(data)
        frames += [e for e in proto.events_received() if isinstance(e, Frame)]
    return frames


async def test_reader_answers_pings_while_a_send_is_stuck(tr: ModuleType, nursery: trio.Nursery) -> None:
    """The reader must keep reading while our writer is blocked on a peer that does not read:
    waiting for the socket there could deadlock two ends that both write. Pongs go out later."""
    received: list[bytes] = []
    got_all = trio.Event()
    sending = trio.Event()
    flood_done = trio.Event()

    async def handler(t: Transport) -> None:
        async def flood() -> None:
            with contextlib.suppress(_impl(t).TransportClosed):
                for _ in range(128):  # 32 MiB: more than loopback socket buffers hold
                    sending.set()
                    await t.send(bytes(256 * 1024))
            flood_done.set()

        async with trio.open_nursery() as inner:
            inner.start_soon(flood)
            with contextlib.suppress(_impl(t).TransportClosed):
                while True:
                    received.append(await t.receive())
                    if len(received) == 20:
                        got_all.set()

    url = await _start_relay(tr, nursery, handler)
    stream, proto = await _sansio_client(url)
    async with stream:
        await sending.wait()
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the flood is stuck on us
        for i in range(20):
            proto.send_ping(b"p%d" % i)
            proto.send_binary(b"m%d" % i)
        await stream.send_all(b"".join(proto.data_to_send()))
        await got_all.wait()  # the reader got past every ping although the writer is stuck
        assert received == [b"m%d" % i for i in range(20)]
        assert not flood_done.is_set()
        # Now read: the flood arrives, and every pong with it.
        pongs: list[bytes] = []
        while len(pongs) < 20:
            frames = await _frames_until(stream, proto, Opcode.PONG)
            pongs += [bytes(f.data) for f in frames if f.opcode is Opcode.PONG]
    assert pongs == [b"p%d" % i for i in range(20)]


async def test_fragmented_message_is_reassembled(tr: ModuleType, nursery: trio.Nursery) -> None:
    url = await _start_relay(tr, nursery, _echo)
    stream, proto = await _sansio_client(url)
    async with stream:
        proto.send_binary(b"one,", fin=False)
        proto.send_ping(b"in between")  # control frames may interleave with fragments
        proto.send_continuation(b"two,", fin=False)
        proto.send_continuation(b"three", fin=True)
        await stream.send_all(b"".join(proto.data_to_send()))
        frames = await _frames_until(stream, proto, Opcode.BINARY)
    assert [f.data for f in frames if f.opcode is Opcode.BINARY] == [b"one,two,three"]
    assert [f.data for f in frames if f.opcode is Opcode.PONG] == [b"in between"]


async def test_peer_close_is_answered_and_reported(tr: ModuleType, nursery: trio.Nursery) -> None:
    reasons: list[str] = []
    done = trio.Event()

    async def handler(t: Transport) -> None:
        try:
            await t.receive()
        except _impl(t).TransportClosed as exc:
            reasons.append(exc.reason)
        done.set()

    url = await _start_relay(tr, nursery, handler)
    stream, proto = await _sansio_client(url)
    async with stream:
        proto.send_close(1001, "going away")
        await stream.send_all(b"".join(proto.data_to_send()))
        frames = await _frames_until(stream, proto, Opcode.CLOSE)
        assert frames[-1].data[:2] == (1001).to_bytes(2, "big")  # echoed
        assert await stream.receive_some() == b""  # the server closes TCP after the exchange
    await done.wait()
    assert reasons == ["WebSocket closed: 1001 GOING_AWAY (going away)"]


async def test_principal_and_auth_throttle(tr: ModuleType, nursery: trio.Nursery) -> None:
    principals: list[object] = []

    async def handler(t: Transport) -> None:
        principals.append(t.principal)

    def authenticate(token: bytes | None) -> object:
        return "group-a" if _authenticate(token) else None

    throttle = AuthThrottle(max_failures=2, window=3600)
    host, port = await nursery.start(
        partial(tr.serve, handler, "127.0.0.1", 0, authenticate=authenticate, auth_throttle=throttle)
    )
    url = f"ws://{host}:{port}/agent"
    async with tr.connect(url, token=TOKEN, ssl_context=None):
        pass
    for _ in range(2):
        with pytest.raises(tr.AuthRejected, match="401"):
            async with tr.connect(url, token="wrong", ssl_context=None):
                pass
    # Blocked now: even the right token gets 429, with a Retry-After.
    rejection = await _raw_rejection(url, subprotocols=[SUBPROTOCOL], extra_headers=AUTH_HEADER)
    assert rejection.status_code == 429
    assert any(name == b"retry-after" and int(value) > 0 for name, value in rejection.headers)
    assert principals == ["group-a"]


async def test_garbage_instead_of_a_handshake(tr: ModuleType, nursery: trio.Nursery) -> None:
    async def babble(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    listeners = await nursery.start(partial(trio.serve_tcp, babble, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(tr.ConnectError) as info:
        async with tr.connect(f"ws://127.0.0.1:{port}/", token=TOKEN, ssl_context=None):
            pass
    assert "\n" not in str(info.value)
    # And the relay answers a request that is not a WebSocket upgrade with a 4xx, then closes.
    url = await _start_relay(tr, nursery, _echo)
    _, host, relay_port, _ = parse_relay_url(url)
    async with await trio.open_tcp_stream(host, relay_port) as stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := await stream.receive_some():
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 4")
