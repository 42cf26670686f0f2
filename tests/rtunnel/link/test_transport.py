"""rtunnel.link.transport's handshakes over real loopback sockets (127.0.0.1, port 0): URLs, tokens, subprotocol,
TLS, timeouts, throttling."""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
from functools import partial
from types import ModuleType

import pytest
import trio
import trio.testing
import trio_websocket

from rtunnel.link import wsserver
from rtunnel.link.transport import SUBPROTOCOL, Transport, parse_relay_url
from rtunnel.net.limits import AuthThrottle
from tests.ports import refused_port

from ..transport_common import (
    AUTH_HEADER,
    TOKEN,
    _authenticate,
    _echo,
    _raw_rejection,
    _start_relay,
)

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


def test_bearer_token_extraction() -> None:
    bearer = wsserver._bearer_token
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
    with refused_port() as port, pytest.raises(tr.ConnectError, match="connection refused"):
        async with tr.connect(f"ws://127.0.0.1:{port}/", token=TOKEN, ssl_context=None):
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


async def test_client_reports_eof_during_handshake(tr: ModuleType, nursery: trio.Nursery) -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some()

    listeners = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    # trio-websocket alone reports this as a timeout, after 10 s. No virtual clock: an autojumping one could
    # reach that deadline while a busy kernel still delivers the FIN over loopback, and the EOF is at once.
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
