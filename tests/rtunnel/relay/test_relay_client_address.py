"""The client address behind a balancer: the PROXY protocol on both listeners (real sockets, in-process relay)
and X-Forwarded-For from trusted proxies (in-memory relay rig)."""

from __future__ import annotations

import logging
import ssl
import struct
from functools import partial

import pytest
import trio
import trustme

from rtunnel.link import transport
from rtunnel.net.clientaddr import TrustedProxies
from rtunnel.net.proxyprotocol import V2_SIGNATURE
from rtunnel.relay.exchange import HttpLimits
from rtunnel.relay.server import Relay, RelayConfig
from tests.ports import connect_from
from tests.trio_helpers import wait_until

from ..relay_rig import relay_rig

TOKEN = b"proxy-protocol-test-token"


def v1(client: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 {port} 8080\r\n".encode()


def v2(client: str, port: int = 40000, *, local: bool = False) -> bytes:
    addresses = (
        bytes(int(b) for b in client.split(".")) + bytes([127, 0, 0, 1]) + struct.pack("!HH", port, 8080)
    )
    return V2_SIGNATURE + bytes([0x20 if local else 0x21, 0x11]) + struct.pack("!H", 12) + addresses


async def _connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def _read_head(stream: trio.SocketStream) -> bytes:
    """The response head, or b"" when the relay closed (or reset: data left unread) without answering."""
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            try:
                chunk = await stream.receive_some()
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk
    return data


async def _get(stream: trio.SocketStream, prefix: bytes = b"") -> bytes:
    await stream.send_all(prefix + b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    return await _read_head(stream)


async def _start(nursery: trio.Nursery, **config: object) -> Relay:
    relay = Relay(RelayConfig(http_port=0, agents_port=0, agent_wait=0, **config))  # type: ignore[arg-type]
    await nursery.start(relay.run)
    return relay


async def test_the_proxy_header_names_the_client_for_limits_and_the_access_log(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "rtunnel.relay.access")
    relay = await _start(nursery, proxy_protocol=True, http_limits=HttpLimits(max_connections_per_ip=1))
    assert relay.http_address is not None
    port = relay.http_address[1]
    # All from 127.0.0.1 (the balancer), for two clients. No agent: 503, and the connection stays open.
    first, second, third = [await _connect(port) for _ in range(3)]
    assert (await _get(first, v1("203.0.113.1"))).startswith(b"HTTP/1.1 503")
    assert b"connection: close" not in (await _get(second, v2("203.0.113.2"))).lower()
    # A second connection of the first client is over its own limit, not over the balancer's.
    refused = await _get(third, v1("203.0.113.1", 40001))
    assert refused.startswith(b"HTTP/1.1 503") and b"connection: close" in refused.lower()
    # A LOCAL header (the balancer's health check) is served as the balancer's own connection.
    async with await _connect(port) as check:
        assert (await _get(check, v2("0.0.0.0", local=True))).startswith(b"HTTP/1.1 503")

    def clients() -> list[str]:
        return [r.getMessage().split()[0] for r in caplog.records if r.name == "rtunnel.relay.access"]

    await wait_until(lambda: len(clients()) >= 3)  # the access line is written after the response
    assert clients() == ["203.0.113.1", "203.0.113.2", "127.0.0.1"]
    for stream in (first, second, third):
        await stream.aclose()


async def test_without_a_valid_header_the_connection_is_closed_and_logged_once(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "rtunnel.relay")

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "PROXY" in r.getMessage()]

    # The head timeout is a real-time one (real sockets). Plain requests are refused for what they are, on a
    # relay whose head timeout no loaded machine can make one of them run into.
    relay = await _start(nursery, proxy_protocol=True, http_limits=HttpLimits(head_timeout=60))
    assert relay.http_address is not None
    for _ in range(3):
        async with await _connect(relay.http_address[1]) as plain:
            assert await _get(plain) == b""  # a plain request: closed unanswered, nothing read past "G"
    assert len(refusals()) == 1, refusals()
    assert "from 127.0.0.1" in refusals()[0] and "not a PROXY protocol header" in refusals()[0]
    # A silent connection is closed at the head timeout (1 s here); once logged, its address is not logged
    # again for the next refusal, whatever its reason.
    quick = await _start(nursery, proxy_protocol=True, http_limits=HttpLimits(head_timeout=1))
    assert quick.http_address is not None
    async with await _connect(quick.http_address[1]) as silent:
        await silent.send_all(b"PROXY TCP4 ")
        assert await _read_head(silent) == b""  # closed at the head timeout
    async with await _connect(quick.http_address[1]) as plain:
        assert await _get(plain) == b""
    assert len(refusals()) == 2, refusals()
    assert "from 127.0.0.1" in refusals()[1] and "no valid PROXY protocol header within 1 s" in refusals()[1]


def _upgrade(token: bytes) -> bytes:
    return (
        b"GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: rtunnel.v1\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
    )


async def test_the_agents_listener_throttles_the_client_its_proxy_header_names(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "rtunnel")
    relay = await _start(nursery, tokens=(TOKEN,), agents_proxy_protocol=True, auth_fail_limit=3)
    assert relay.agents_address is not None
    port = relay.agents_address[1]

    async def attempt(header: bytes, token: bytes) -> bytes:
        async with await _connect(port) as stream:
            await stream.send_all(header + _upgrade(token))
            return (await _read_head(stream)).split(b"\r\n", 1)[0]

    for i in range(3):
        assert await attempt(v1("203.0.113.66", 50000 + i), b"wrong") == b"HTTP/1.1 401 Unauthorized"
    assert await attempt(v2("203.0.113.66"), TOKEN) == b"HTTP/1.1 429 Too Many Requests"  # blocked
    # Another client behind the same balancer is not: its agent gets in.
    assert await attempt(v2("203.0.113.77"), TOKEN) == b"HTTP/1.1 101 Switching Protocols"
    assert await attempt(b"", TOKEN) == b""  # no header: closed
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "rejected 203.0.113.66:50000: missing or wrong token" in messages
    assert "failed agent authentications from 203.0.113.66" in messages
    assert "agents listener: closing a connection from 127.0.0.1" in messages


async def test_a_trusted_proxys_connections_are_not_limited_per_address(nursery: trio.Nursery) -> None:
    limits = HttpLimits(max_connections_per_ip=1)
    relay = await _start(nursery, http_limits=limits, trusted_proxies=("127.0.0.1/32",))
    assert relay.http_address is not None
    streams = [await _connect(relay.http_address[1]) for _ in range(3)]
    for stream in streams:
        assert b"connection: close" not in (await _get(stream)).lower()  # 503 "no agent", kept open
        await stream.aclose()


async def test_behind_a_trusted_proxy_exchanges_are_limited_per_forwarded_client() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    async with relay_rig(HttpLimits(max_exchanges_per_ip=1)) as rig:
        via_proxy = await rig.connect("10.0.0.5", trusted=proxies)
        await via_proxy.send(
            b"GET /hold/a HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.9, 203.0.113.1\r\n\r\n"
        )
        await wait_until(lambda: rig.agent.seen)
        # The same client through another connection of the proxy: over its limit.
        again = await rig.connect("10.0.0.5", trusted=proxies)
        await again.send(b"GET /b HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 203.0.113.1\r\n\r\n")
        assert (await again.response())[0] == 429
        # Another client of the proxy, and a client that merely claims to be 203.0.113.1: served.
        await again.send(b"GET /c HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 203.0.113.2, 10.1.1.1\r\n\r\n")
        assert (await again.response())[0] == 200
        liar = await rig.connect("198.51.100.3", trusted=None)
        await liar.send(b"GET /d HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 203.0.113.1\r\n\r\n")
        assert (await liar.response())[0] == 200
        rig.agent.release("a")
        assert (await via_proxy.response())[0] == 200
    forwarded = {
        s.head.target: [v for n, v in s.head.headers if n.lower() == b"x-forwarded-for"]
        for s in rig.agent.seen
    }
    # The chain is kept and the connection's own peer appended, as every hop does.
    assert forwarded[b"/hold/a"] == [b"198.51.100.9, 203.0.113.1, 10.0.0.5"]
    assert forwarded[b"/c"] == [b"203.0.113.2, 10.1.1.1, 10.0.0.5"]
    assert forwarded[b"/d"] == [b"203.0.113.1, 198.51.100.3"]
    assert b"/b" not in forwarded


async def test_with_tls_the_proxy_header_comes_before_the_handshake(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "rtunnel")
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    relay = await _start(nursery, tokens=(TOKEN,), agents_proxy_protocol=True, ssl_context=server)
    assert relay.agents_address is not None

    async def attempt(token: bytes) -> bytes:
        tcp = await _connect(relay.agents_address[1])  # type: ignore[index]
        await tcp.send_all(v1("203.0.113.88", 41000))
        tls = trio.SSLStream(tcp, client, server_hostname="127.0.0.1")
        await tls.send_all(_upgrade(token))
        head = b""
        with trio.fail_after(10):
            while b"\r\n" not in head:
                head += await tls.receive_some()
        await trio.aclose_forcefully(tls)
        return head.split(b"\r\n", 1)[0]

    assert await attempt(b"wrong") == b"HTTP/1.1 401 Unauthorized"
    assert any("rejected 203.0.113.88:41000" in r.getMessage() for r in caplog.records)
    assert await attempt(TOKEN) == b"HTTP/1.1 101 Switching Protocols"


async def test_an_address_with_too_many_handshakes_in_progress_is_closed_at_once(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "rtunnel")

    async def handler(link: transport.Transport) -> None:
        return

    _, port = await nursery.start(
        partial(
            transport.serve,
            handler,
            "127.0.0.1",
            0,
            authenticate=lambda t: t == TOKEN,
            max_handshakes_per_ip=2,
        )
    )
    stalled = [await connect_from("127.0.0.2", port) for _ in range(2)]
    for stream in stalled:
        await stream.send_all(b"GET / HTTP/1.1\r\n")  # a handshake in progress, never finished
    over = await connect_from("127.0.0.2", port)
    assert await _read_head(over) == b""  # closed before anything was read or answered
    async with await _connect(port) as other:  # another address is not affected
        await other.send_all(_upgrade(TOKEN))
        assert (await _read_head(other)).startswith(b"HTTP/1.1 101")
    assert (
        sum("too many agent handshakes in progress from 127.0.0.2" in r.getMessage() for r in caplog.records)
        == 1
    )
    for stream in (*stalled, over):
        await stream.aclose()
