"""End to end: protocol switches through the tunnel (SPEC.md 5.5), with a real WebSocket client and server.

client (trio-websocket) -> relay process -> agent process -> upstream (tests/e2e/wsupstream.py: trio-websocket
server, a raw-bytes Upgrade protocol and plain HTTP on one port). Nothing here measures time: a test that
fails hangs until its fail_after budget, never on a threshold.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio_websocket

from .procs import Agent, Relay, http_client, run_agent, run_relay
from .rawhttp import open_raw, request_bytes
from .wsupstream import MAX_MESSAGE, WsUpstream, open_ws_upstream

pytestmark = pytest.mark.e2e

MiB = 1 << 20
BUDGET = 120  # seconds for a whole test on a loaded 2-core machine; a broken tunnel hangs, then fails


@dataclass
class Tunnel:
    relay: Relay
    agent: Agent
    upstream: WsUpstream

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.relay.http_port}{path}"


@asynccontextmanager
async def tunnel(
    token: str, *, allow: Sequence[str] = (), relay_args: Sequence[str] = (), agent_args: Sequence[str] = ()
) -> AsyncIterator[Tunnel]:
    async with (
        open_ws_upstream() as upstream,
        run_relay(token, extra_args=relay_args) as relay,
        run_agent(
            relay.agents_url,
            f"http://127.0.0.1:{upstream.port}",
            token=token,
            allow=allow,
            extra_args=agent_args,
        ) as agent,
    ):
        yield Tunnel(relay, agent, upstream)


@asynccontextmanager
async def websocket(url: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    async with trio_websocket.open_websocket_url(
        url, max_message_size=MAX_MESSAGE, receive_buffer_size=None, connect_timeout=30, disconnect_timeout=30
    ) as ws:
        yield ws


async def test_echo_text_and_binary_messages_up_to_16_mib(token: str) -> None:
    sizes = [0, 1, 125, 126, 65_535, 65_536, 300_000, 1 * MiB, 16 * MiB]
    with trio.fail_after(BUDGET):
        async with tunnel(token) as t, websocket(t.ws_url("/ws/echo")) as ws:
            for size in sizes:
                binary = os.urandom(size)
                await ws.send_message(binary)
                echoed = await ws.get_message()
                assert isinstance(echoed, bytes)
                assert hashlib.sha256(echoed).digest() == hashlib.sha256(binary).digest(), size
                text = ("tunnel ✓ " * (size // 11 + 1))[:size]
                await ws.send_message(text)
                assert await ws.get_message() == text, size
        # The client's context exit closed the session (1000); the server saw exactly that.
        await t.upstream.wait_sessions(1)
    assert t.upstream.sessions == [("/ws/echo", 1000, None)]
    assert "GET /ws/echo 101" in t.relay.log_text()


async def test_100_concurrent_sessions_next_to_ordinary_requests(token: str) -> None:
    sessions, requests = 100, 200
    # Each session is an exchange in progress for as long as it lasts: the per-address limits of the relay
    # (256 exchanges, 256 connections from one address by default) must allow them all from 127.0.0.1.
    limits = ["--max-exchanges-per-ip", "400", "--max-connections-per-ip", "400"]
    with trio.fail_after(BUDGET):
        async with tunnel(token, relay_args=limits) as t:
            all_open = trio.Event()
            opened = 0

            async def session(i: int) -> None:
                nonlocal opened
                async with websocket(t.ws_url(f"/ws/echo/{i}")) as ws:
                    opened += 1
                    if opened == sessions:
                        all_open.set()
                    await all_open.wait()  # all 100 are open at the same time
                    for j in range(3):
                        message = f"session {i} message {j}"
                        await ws.send_message(message)
                        assert await ws.get_message() == message
                    await ws.send_message(i.to_bytes(2, "big") * 1000)
                    assert await ws.get_message() == i.to_bytes(2, "big") * 1000

            async def ordinary(client_index: int) -> None:
                async with http_client(f"http://127.0.0.1:{t.relay.http_port}") as client:
                    for k in range(requests // 10):
                        response = await client.get(f"/plain/{client_index}/{k}")
                        assert response.status_code == 200
                        assert response.text == f"plain /plain/{client_index}/{k}\n"

            async with trio.open_nursery() as nursery:
                for i in range(sessions):
                    nursery.start_soon(session, i)
                for c in range(10):
                    nursery.start_soon(ordinary, c)
            await t.upstream.wait_sessions(sessions)
    assert sorted(path for path, _, _ in t.upstream.sessions) == sorted(
        f"/ws/echo/{i}" for i in range(sessions)
    )
    assert {(code, reason) for _, code, reason in t.upstream.sessions} == {(1000, None)}


async def test_close_initiated_by_the_client_is_clean(token: str) -> None:
    with trio.fail_after(BUDGET):
        async with tunnel(token) as t:
            async with websocket(t.ws_url("/ws/echo")) as ws:
                await ws.send_message("hello")
                assert await ws.get_message() == "hello"
                await ws.aclose(code=4001, reason="client says bye")
                # The server's Close came back through the tunnel: the handshake completed.
                assert ws.closed is not None
                assert (ws.closed.code, ws.closed.reason) == (4001, "client says bye")
            await t.upstream.wait_sessions(1)
            await t.relay.wait_for_line("GET /ws/echo 101")
            await t.agent.wait_for_line("(switched protocols)")
    assert t.upstream.sessions == [("/ws/echo", 4001, "client says bye")]
    assert "ended abnormally" not in t.relay.log_text() + t.agent.log_text()


async def test_close_initiated_by_the_server_is_clean(token: str) -> None:
    with trio.fail_after(BUDGET):
        async with tunnel(token) as t:
            # The client owns its TCP connection here: trio-websocket's client does not close it after a
            # close the server initiated (it waits for the server's FIN, then keeps its own side open), and
            # the tunnel passes that FIN on as a half-close. A browser closes its side then; so does this test.
            tcp = await trio.open_tcp_stream("127.0.0.1", t.relay.http_port)
            async with tcp, trio.open_nursery() as nursery:
                ws = await trio_websocket.wrap_client_stream(
                    nursery, tcp, f"127.0.0.1:{t.relay.http_port}", "/ws/close-from-server"
                )
                assert await ws.get_message() == "bye"
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None
                assert (closed.value.reason.code, closed.value.reason.reason) == (4000, "server says bye")
                nursery.cancel_scope.cancel()  # leaving the block closes the TCP connection
            await t.upstream.wait_sessions(1)
            await t.relay.wait_for_line("GET /ws/close-from-server 101")
            await t.agent.wait_for_line("(switched protocols)")
    assert t.upstream.sessions == [("/ws/close-from-server", 4000, "server says bye")]
    assert "ended abnormally" not in t.relay.log_text() + t.agent.log_text()


async def test_upstream_reset_aborts_the_client_connection(token: str) -> None:
    with trio.fail_after(BUDGET):
        async with tunnel(token) as t, websocket(t.ws_url("/ws/abort")) as ws:
            assert await ws.get_message() == "doomed"
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            # No Close frame: the TCP connection was cut (1006), not closed as if the session were complete.
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1006
        await t.agent.wait_for_line("switched protocol ended abnormally")


async def test_allowlist_denies_an_upgrade_path(token: str) -> None:
    with trio.fail_after(BUDGET):
        async with tunnel(token, allow=["GET /ws/**"]) as t:
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with websocket(t.ws_url("/private/ws")):
                    pass
            assert rejected.value.status_code == 403
            assert rejected.value.body is not None
            assert b"GET /private/ws is not allowed here" in rejected.value.body
            async with websocket(t.ws_url("/ws/echo")) as ws:  # an allowed path still switches
                await ws.send_message("allowed")
                assert await ws.get_message() == "allowed"
    assert "/private/ws" not in t.upstream.paths
    assert t.upstream.paths == ["/ws/echo"]


async def test_any_upgrade_token_carries_raw_bytes_with_half_close(token: str) -> None:
    data = os.urandom(3 * MiB + 17)
    with trio.fail_after(BUDGET):
        async with tunnel(token) as t:
            stream = await trio.open_tcp_stream("127.0.0.1", t.relay.http_port)
            async with stream:
                head = request_bytes("GET", "/raw", [("Upgrade", "x-echo"), ("Connection", "Upgrade")])
                await stream.send_all(head + data[:1000])  # bytes right behind the head belong to the switch
                received = bytearray()
                while b"\r\n\r\n" not in received:
                    received += await stream.receive_some(65536)
                status_line, _, rest = bytes(received).partition(b"\r\n")
                assert status_line == b"HTTP/1.1 101 Switching Protocols"
                received = bytearray(rest.partition(b"\r\n\r\n")[2])

                async def send_rest() -> None:
                    await stream.send_all(data[1000:])
                    await (
                        stream.send_eof()
                    )  # our FIN travels as END_STREAM; the upstream answers with its own

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_rest)
                    while chunk := await stream.receive_some(65536):
                        received += chunk
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
    assert len(received) == len(data)


async def test_declined_upgrade_goes_on_as_http(token: str) -> None:
    with trio.fail_after(BUDGET):
        async with tunnel(token) as t, open_raw(t.relay.http_port) as raw:
            await raw.send(
                request_bytes("GET", "/maybe", [("Upgrade", "x-decline"), ("Connection", "upgrade")])
            )
            first = await raw.response()
            await raw.send(request_bytes("GET", "/after"))
            second = await raw.response()
    assert (first.status, first.body) == (200, b"declined\n")
    assert (second.status, second.body) == (200, b"plain /after\n")  # same client connection, kept alive
