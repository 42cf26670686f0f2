"""An established link (rtunnel.link.wslink) over real loopback sockets: failures, aborts, cancelled sends, limits,
and third-party peers' pings and fragments."""

from __future__ import annotations

import contextlib
import logging
import ssl
from functools import partial
from types import ModuleType

import pytest
import trio
import trio.testing
import trio_websocket
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI

from protocol import Connection, ErrorCode, GoAwayReceived, HandshakeComplete, RemoteProtocolError, Role
from rtunnel.link.mux import Multiplexer
from rtunnel.link.transport import SUBPROTOCOL, Transport, parse_relay_url

from ..transport_common import (
    AUTH_HEADER,
    TOKEN,
    _echo,
    _impl,
    _start_relay,
)

# --------------------------------------------------------------------------------------------
# failures on an established link


class EndOfLink:
    """A relay handler that waits for the end of its link and keeps why it ended (TransportClosed.reason)."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.ended = 0
        self._changed = trio.Event()

    async def handler(self, t: Transport) -> None:
        try:
            await t.receive()
        except _impl(t).TransportClosed as exc:
            self.reasons.append(exc.reason)
        self.ended += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, links: int = 1) -> None:
        """Until `links` handlers have returned."""
        while self.ended < links:
            await self._changed.wait()


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
    server = EndOfLink()
    url = await _start_relay(tr, nursery, server.handler)
    async with tr.connect(url, token=TOKEN, ssl_context=None):
        pass
    await server.wait(1)
    with pytest.raises(RuntimeError):
        async with tr.connect(url, token=TOKEN, ssl_context=None):
            raise RuntimeError("agent bug")
    await server.wait(2)
    assert server.reasons[0] == "WebSocket closed: 1000 NORMAL_CLOSURE"
    assert server.reasons[1].startswith("connection lost")


async def test_abort_is_seen_by_the_peer(tr: ModuleType, nursery: trio.Nursery) -> None:
    server = EndOfLink()
    url = await _start_relay(tr, nursery, server.handler)
    async with tr.connect(url, token=TOKEN, ssl_context=None) as t:
        t.abort()
        t.abort()  # idempotent
        with pytest.raises(tr.TransportClosed, match="aborted locally"):
            await t.receive()
        with pytest.raises(tr.TransportClosed, match="aborted locally"):
            await t.send(b"x")
    await server.wait()
    assert server.reasons and server.reasons[0].startswith("connection lost")


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
    in_send = False
    async with tr.connect(url, token=TOKEN, ssl_context=None) as t:

        async def flood() -> None:
            nonlocal in_send
            chunk = bytes(256 * 1024)
            try:
                while True:
                    in_send = True
                    await t.send(chunk)
                    in_send = False
            except tr.TransportClosed as exc:
                outcome.append(exc.reason)

        async with trio.open_nursery() as inner:
            inner.start_soon(flood)
            # Every task blocked: the flood waits inside a send (on a full socket, or on an ACK that frees
            # send buffer; either way a send that only the abort can end now). No real-time cushion needed.
            await trio.testing.wait_all_tasks_blocked()
            assert in_send
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
                await trio.testing.wait_all_tasks_blocked()  # the loop below is blocked inside a send
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
    server = EndOfLink()
    url = await _start_relay(tr, nursery, server.handler)
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
    await server.wait()
    assert server.reasons and "text message" in server.reasons[0]


async def test_message_over_limit_closes_with_1009(tr: ModuleType, nursery: trio.Nursery) -> None:
    async def big_sender(t: Transport) -> None:
        with contextlib.suppress(tr.TransportClosed):
            await t.send(bytes(4096))
            await t.receive()

    url = await _start_relay(tr, nursery, big_sender)
    async with tr.connect(url, token=TOKEN, ssl_context=None, max_message_size=1024) as t:
        with pytest.raises(tr.TransportClosed, match="1009"):
            await t.receive()


async def test_message_over_limit_behind_the_handshake_closes_with_1009(
    tr: ModuleType, nursery: trio.Nursery
) -> None:
    """The 101 and an oversized message in one segment: the handshake's read brings the frame, which the link
    must still refuse with the Close the protocol queues (it once waited for data that never came)."""
    closes: list[Frame] = []

    async def server(stream: trio.SocketStream) -> None:
        proto = ServerProtocol(subprotocols=[Subprotocol(SUBPROTOCOL)])
        while not (events := proto.events_received()):
            proto.receive_data(await stream.receive_some())
        request = events[0]
        assert isinstance(request, Request)
        proto.send_response(proto.accept(request))
        proto.send_binary(bytes(4096))
        await stream.send_all(b"".join(proto.data_to_send()))  # one write: 101 and frame together
        while not closes:
            data = await stream.receive_some()
            if not data:
                return
            proto.receive_data(data)
            closes.extend(
                e for e in proto.events_received() if isinstance(e, Frame) and e.opcode is Opcode.CLOSE
            )

    listeners = await nursery.start(partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with tr.connect(
        f"ws://127.0.0.1:{port}/agent", token=TOKEN, ssl_context=None, max_message_size=1024
    ) as t:
        with pytest.raises(tr.TransportClosed, match="1009"):
            await t.receive()
    assert closes and closes[0].data[:2] == (1009).to_bytes(2, "big")


# --------------------------------------------------------------------------------------------
# third-party peers: pings and fragmented messages (a sans-IO websockets client as the peer)


async def _sansio_client(url: str) -> tuple[trio.SocketStream, ClientProtocol]:
    """An independent WebSocket client: our own socket, the websockets sans-IO core, no library loop.

    Frames that arrived in the same read as the handshake response are kept for _frames_until."""
    _, host, port, path = parse_relay_url(url)
    stream = await trio.open_tcp_stream(host, port)
    proto = ClientProtocol(WebSocketURI(False, host, port, path, ""), subprotocols=[Subprotocol(SUBPROTOCOL)])
    request = proto.connect()
    request.headers["Authorization"] = "Bearer " + TOKEN
    proto.send_request(request)
    await stream.send_all(b"".join(proto.data_to_send()))
    events: list[object] = []
    while not events:
        proto.receive_data(await stream.receive_some())
        events = proto.events_received()
    assert proto.handshake_exc is None
    _early[id(proto)] = [e for e in events if isinstance(e, Frame)]
    return stream, proto


_early: dict[int, list[Frame]] = {}  # per client protocol: frames read together with its handshake response


async def _frames_until(stream: trio.SocketStream, proto: ClientProtocol, opcode: Opcode) -> list[Frame]:
    frames: list[Frame] = _early.pop(id(proto), [])
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
    in_send = False

    async def handler(t: Transport) -> None:
        async def flood() -> None:
            nonlocal in_send
            with contextlib.suppress(_impl(t).TransportClosed):
                for _ in range(128):  # 32 MiB: more than loopback socket buffers hold
                    sending.set()
                    in_send = True
                    await t.send(bytes(256 * 1024))
                    in_send = False
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
        # Every task blocked: the flood waits inside a send, for us to read (we never do before the pongs).
        await trio.testing.wait_all_tasks_blocked()
        assert in_send
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
    server = EndOfLink()
    url = await _start_relay(tr, nursery, server.handler)
    stream, proto = await _sansio_client(url)
    async with stream:
        proto.send_close(1001, "going away")
        await stream.send_all(b"".join(proto.data_to_send()))
        frames = await _frames_until(stream, proto, Opcode.CLOSE)
        assert frames[-1].data[:2] == (1001).to_bytes(2, "big")  # echoed
        assert await stream.receive_some() == b""  # the server closes TCP after the exchange
    await server.wait()
    assert server.reasons == ["WebSocket closed: 1001 GOING_AWAY (going away)"]


async def test_websocket_pings_count_against_the_protocols_ping_budget(
    tr: ModuleType, nursery: trio.Nursery
) -> None:
    """A peer pinging one layer down (WebSocket pings, each answered with a pong) is cut off like a PING flood:
    GOAWAY with ENHANCE_YOUR_CALM, then the link closes, long before 20,000 pongs."""
    failures: list[BaseException] = []

    async def handler(t: Transport) -> None:
        try:
            await Multiplexer(t, Role.ACCEPTOR).run()
        except RemoteProtocolError as exc:
            failures.append(exc)
        t.abort()  # as the relay does after a protocol error

    url = await _start_relay(tr, nursery, handler)
    stream, proto = await _sansio_client(url)
    peer = Connection(Role.DIALER)
    proto.send_binary(peer.data_to_send())
    await stream.send_all(b"".join(proto.data_to_send()))
    events: list[object] = []
    pongs = 0
    async with stream:
        while not any(isinstance(e, HandshakeComplete) for e in events):
            for frame in await _frames_until(stream, proto, Opcode.BINARY):
                if frame.opcode is Opcode.BINARY:
                    events += peer.receive_data(frame.data)
        with trio.fail_after(30):
            for batch in range(200):
                for i in range(100):
                    proto.send_ping(b"%d" % (batch * 100 + i))
                try:
                    await stream.send_all(b"".join(proto.data_to_send()))
                except trio.BrokenResourceError:
                    break
                answered = 0
                while answered < 100:
                    data = await stream.receive_some()
                    if not data:
                        break
                    proto.receive_data(data)
                    for frame in proto.events_received():
                        if not isinstance(frame, Frame):
                            continue
                        if frame.opcode is Opcode.PONG:
                            answered += 1
                        elif frame.opcode is Opcode.BINARY:
                            events += peer.receive_data(frame.data)
                pongs += answered
                if answered < 100:
                    break
    goaways = [e for e in events if isinstance(e, GoAwayReceived)]
    assert [g.error_code for g in goaways] == [ErrorCode.ENHANCE_YOUR_CALM]
    assert [getattr(f, "error_code", None) for f in failures] == [ErrorCode.ENHANCE_YOUR_CALM]
    assert pongs < 1000  # the budget's burst (50) plus its refill, not the 20,000 asked for


# --------------------------------------------------------------------------------------------
# writing without waiting (send_nowait), as the mux does while the link is idle


async def test_send_nowait_holds_what_the_kernel_did_not_take_and_writes_it_first(
    tr: ModuleType, nursery: trio.Nursery
) -> None:
    """Messages written with send_nowait to a peer that does not read: once the socket is full the rest of a
    frame is held (can_send_nowait turns False), and flush, then send, deliver every message whole and in
    order once the peer reads."""
    start_reading = trio.Event()
    received: list[bytes] = []
    got_last = trio.Event()

    async def slow_reader(t: Transport) -> None:
        await start_reading.wait()
        with contextlib.suppress(_impl(t).TransportClosed):
            while True:
                received.append(await t.receive())
                if received[-1] == b"last":
                    got_last.set()

    url = await _start_relay(tr, nursery, slow_reader)
    async with tr.connect(url, token=TOKEN, ssl_context=None) as t:
        sent: list[bytes] = []
        while t.can_send_nowait:
            message = bytes([len(sent) % 251]) * (200 * 1024 + len(sent))
            t.send_nowait(message)
            sent.append(message)
            assert len(sent) < 10_000, "the socket never filled up"
        assert t.send_pending
        start_reading.set()
        with trio.fail_after(10):
            await t.flush()
            assert not t.send_pending and t.can_send_nowait
            await t.send(b"last")
            sent.append(b"last")
            await got_last.wait()
    assert received == sent


async def test_send_nowait_is_not_offered_over_tls(
    tr: ModuleType, nursery: trio.Nursery, server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    """TLS writes go through the SSL object: a wss:// link always sends through send()."""
    url = await _start_relay(tr, nursery, _echo, scheme="wss", ssl_context=server_ssl)
    async with tr.connect(url, token=TOKEN, ssl_context=client_ssl) as t:
        assert not t.can_send_nowait
        await t.send(b"through TLS")
        assert await t.receive() == b"through TLS"
