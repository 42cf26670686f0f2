"""Who the client is: the PROXY header read off a real socket, refusals logged once, X-Forwarded-For from
trusted proxies."""

from __future__ import annotations

import logging
import socket

import pytest
import trio
import trio.testing

from rtunnel.net.clientaddr import (
    OncePer,
    ProxyHeaderGate,
    ProxyHeaderMissing,
    TrustedProxies,
    read_proxy_header,
)
from rtunnel.net.proxyprotocol import V2_SIGNATURE, ProxyProtocolError

V1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 8080\r\n"
V2 = V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([203, 0, 113, 9, 10, 0, 0, 1]) + b"\x9c\x40\x1f\x90"


async def _trickle(sock: trio.socket.SocketType, header: bytes, after: bytes) -> None:
    # Split across reads: a byte at a time through the header, the rest in one go.
    for i in range(len(header)):
        await sock.send(header[i : i + 1])
        await trio.sleep(0.001)
    await sock.send(after)


async def test_the_header_is_consumed_exactly_and_what_follows_stays_for_the_next_reader() -> None:
    after = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    for header, client in ((V1, "203.0.113.7"), (V2, "203.0.113.9")):
        left, right = trio.socket.socketpair()
        with left, right:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_trickle, left, header, after)
                parsed = await read_proxy_header(right)
            assert parsed.client_address == client
            received = b""
            while len(received) < len(after):
                received += await right.recv(4096)
            assert received == after


async def test_a_malformed_header_is_refused_without_reading_what_follows() -> None:
    left, right = trio.socket.socketpair()
    with left, right:
        await left.send(b"GET / HTTP/1.1\r\n\r\n")
        with pytest.raises(ProxyProtocolError):
            await read_proxy_header(right)
        assert await right.recv(4096, socket.MSG_PEEK) == b"GET / HTTP/1.1\r\n\r\n"  # nothing consumed
        left.shutdown(socket.SHUT_WR)
        await right.recv(4096)
        with pytest.raises(ProxyHeaderMissing, match="closed after 0 bytes"):
            await read_proxy_header(right)


async def test_the_gate_closes_silent_connections_and_logs_once_per_address(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    gate = ProxyHeaderGate("http listener", 5, log_interval=60)
    caplog.set_level(logging.WARNING, "rtunnel.relay")
    pairs = [trio.socket.socketpair() for _ in range(3)]
    try:
        for left, right in pairs:
            await left.send(V1[:10])  # part of a header, then nothing
            started = trio.current_time()
            assert await gate.accept(right, "198.51.100.1") is None
            assert trio.current_time() - started == pytest.approx(5)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1
        assert "198.51.100.1" in lines[0] and "no valid PROXY protocol header within 5 s" in lines[0]
        await trio.sleep(61)
        left, right = pairs[0]
        await left.send(b"junk")
        assert await gate.accept(right, "198.51.100.1") is None
        assert "2 more refused since the last line" in caplog.records[-1].getMessage()
        assert "not a PROXY protocol header" in caplog.records[-1].getMessage()
    finally:
        for left, right in pairs:
            left.close()
            right.close()


def test_once_per_interval_and_key_with_bounded_memory() -> None:
    once = OncePer(10, max_keys=2)
    assert once.should_log("a", 0) == (True, 0)
    assert once.should_log("a", 5) == (False, 0)
    assert once.should_log("b", 5) == (True, 0)
    assert once.should_log("a", 10) == (True, 1)
    assert once.should_log("c", 11) == (True, 0)  # "b" is forgotten: the least recently logged
    assert once.should_log("b", 12) == (True, 0)


@pytest.mark.parametrize(
    ("values", "peer", "client"),
    [
        ([], "10.0.0.5", "10.0.0.5"),  # no header: the proxy's own request
        ([b"203.0.113.7"], "10.0.0.5", "203.0.113.7"),
        ([b"198.51.100.1, 203.0.113.7, 10.1.2.3"], "10.0.0.5", "203.0.113.7"),  # spoofed entry left of it
        ([b"198.51.100.1", b"203.0.113.7 , 10.1.2.3"], "10.0.0.5", "203.0.113.7"),  # several headers
        ([b"10.9.9.9, 10.1.2.3"], "10.0.0.5", "10.9.9.9"),  # all trusted: the farthest one
        ([b"garbage, 10.1.2.3"], "10.0.0.5", "10.1.2.3"),  # no address: stop at the last trusted hop
        ([b"[2001:db8::7]:443, 10.1.2.3:55000"], "10.0.0.5", "2001:db8::7"),
        ([b"203.0.113.7:1234"], "10.0.0.5", "203.0.113.7"),
        ([b"::ffff:203.0.113.7"], "10.0.0.5", "203.0.113.7"),
        ([b""], "10.0.0.5", "10.0.0.5"),
    ],
)
def test_the_client_behind_trusted_proxies_is_the_rightmost_untrusted_address(
    values: list[bytes], peer: str, client: str
) -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "2001:db8:ffff::/48"])
    assert proxies.client_of(values, peer) == client


def test_trusted_networks() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"])
    assert proxies.contains("10.200.0.1")
    assert proxies.contains("192.0.2.1")
    assert not proxies.contains("192.0.2.2")
    assert proxies.contains("2001:db8::1")
    assert proxies.contains("::ffff:10.0.0.1")
    assert not proxies.contains("not an address")
    assert not TrustedProxies()
