"""Named-tunnel routing (registry.TunnelRouter) and the protocol-switch helpers (passthrough), in one process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from protocol import RequestHead, ResponseHead
from rtunnel.http.passthrough import pump, upgrade_offer, with_upgrade
from rtunnel.link.mux import MuxStream
from rtunnel.relay.registry import NoRoute, Route, Tunnel, TunnelRouter

from .memtransport import running_pair

# -- routing -------------------------------------------------------------------------------------------------

ROUTER = TunnelRouter(
    0,
    [
        Tunnel("shop", hosts=("shop.example", "alt.example:8443")),
        Tunnel("api", path_prefix="/api/"),
        Tunnel("v2", path_prefix="/api/v2"),
        Tunnel("docs", path_prefix="/docs", strip_prefix=False),
    ],
)


@pytest.mark.parametrize(
    ("host", "target", "tunnel", "forwarded", "prefix"),
    [
        (b"shop.example", b"/cart?x=1", "shop", b"/cart?x=1", None),
        (b"SHOP.example.:80", b"/", "shop", b"/", None),
        (b"alt.example:8443", b"/", "shop", b"/", None),
        (b"shop.example", b"/api/x", "shop", b"/api/x", None),  # a host rule outranks a prefix
        (b"x.example", b"/api", "api", b"/", b"/api"),
        (b"x.example", b"/api/?q", "api", b"/?q", b"/api"),
        (b"x.example", b"/api/v2/users?page=2", "v2", b"/users?page=2", b"/api/v2"),  # longest prefix
        (b"x.example", b"/%61pi/x/../y", "api", b"/y", b"/api"),  # matched on the normalized path
        (b"x.example", b"/docs/intro", "docs", b"/docs/intro", None),  # keep-prefix
    ],
)
def test_routes(host: bytes, target: bytes, tunnel: str, forwarded: bytes, prefix: bytes | None) -> None:
    route = ROUTER.route(host, target)
    assert isinstance(route, Route)
    assert (route.tunnel, route.target, route.stripped_prefix) == (tunnel, forwarded, prefix)
    assert route.registry is ROUTER.registry(tunnel)


@pytest.mark.parametrize(
    ("host", "target", "status"),
    [
        (b"alt.example", b"/", 404),  # that host is routed for port 8443 only
        (b"x.example", b"/apix", 404),  # prefixes match whole segments
        (None, b"/", 404),
        (b"x.example", b"/api/%2F", 400),  # refused by normalization, as the agent would
    ],
)
def test_no_route(host: bytes | None, target: bytes, status: int) -> None:
    route = ROUTER.route(host, target)
    assert isinstance(route, NoRoute)
    assert route.status == status


def test_forwarded_prefix_header_is_the_relays_own() -> None:
    route = ROUTER.route(b"x", b"/api/x")
    assert isinstance(route, Route)
    # The client's own X-Forwarded-Prefix never gets this far (proxyheaders.add_forwarding drops it).
    headers = [(b"Host", b"x")]
    assert route.forwarded(headers) == [(b"Host", b"x"), (b"X-Forwarded-Prefix", b"/api")]
    assert headers == [(b"Host", b"x")]


def test_without_tunnels_every_request_goes_to_the_default() -> None:
    router = TunnelRouter(0)
    route = router.route(None, b"/%2F/anything")
    assert isinstance(route, Route)
    assert (route.tunnel, route.target) == (None, b"/%2F/anything")
    headers = [(b"Host", b"x")]
    assert route.forwarded(headers) == headers  # nothing stripped, nothing to name


def test_a_host_routed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="two tunnels"):
        TunnelRouter(0, [Tunnel("a", hosts=("x.example",)), Tunnel("b", hosts=("X.example.",))])


# -- which requests switch -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "offer"),
    [
        ([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], b"websocket"),
        ([(b"connection", b"keep-alive, upgrade"), (b"upgrade", b"x-proto/2")], b"x-proto/2"),
        ([(b"Connection", b"upgrade"), (b"Upgrade", b"h2c, websocket")], b"websocket"),
        ([(b"Connection", b"upgrade"), (b"Upgrade", b"H2C")], None),
        ([(b"Upgrade", b"websocket")], None),  # no Connection: upgrade
        ([(b"Connection", b"upgrade")], None),  # nothing to switch to
    ],
)
def test_upgrade_offer(headers: list[tuple[bytes, bytes]], offer: bytes | None) -> None:
    assert upgrade_offer(headers) == offer


def test_with_upgrade_keeps_only_what_the_next_hop_needs() -> None:
    headers = [
        (b"Host", b"h"),
        (b"Connection", b"upgrade, x-hop"),
        (b"X-Hop", b"1"),
        (b"Upgrade", b"h2c, ws"),
    ]
    assert with_upgrade(headers, b"ws") == [(b"Host", b"h"), (b"Upgrade", b"ws"), (b"Connection", b"upgrade")]
    assert with_upgrade(headers, None) == [(b"Host", b"h")]


# -- the byte pump -------------------------------------------------------------------------------------------


@asynccontextmanager
async def switched_stream() -> AsyncIterator[tuple[MuxStream, MuxStream]]:
    """(relay's end, agent's end) of one stream over an in-memory link."""
    opened: trio.MemorySendChannel[MuxStream]
    opened, receive = trio.open_memory_channel[MuxStream](1)
    done = trio.Event()

    async def handler(stream: MuxStream) -> None:
        await stream.send_reply(ResponseHead(101, b"Switching Protocols"))
        await opened.send(stream)
        await done.wait()

    async with running_pair(handler) as pair:
        ours = await pair.relay.open_stream(RequestHead(b"GET", b"/", ()))
        theirs = await receive.receive()
        assert (await ours.receive_reply()).status == 101
        yield ours, theirs
        done.set()


async def test_pump_passes_bytes_and_half_closes_each_way() -> None:
    async with switched_stream() as (ours, theirs):
        near, far = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            results = []

            async def run_pump() -> None:
                results.append(await pump(theirs, near, initial=b"early "))

            nursery.start_soon(run_pump)
            await far.send_all(b"from tcp")
            await far.send_eof()
            got = b""
            while chunk := await ours.receive_data():
                got += chunk
            assert got == b"early from tcp"  # then END_STREAM: the TCP peer's FIN
            await ours.send_data(b"to tcp", end_stream=True)
            received = b""
            while chunk := await far.receive_some():
                received += chunk
            assert received == b"to tcp"  # then EOF: END_STREAM became a FIN
        assert results[0].error is None
        assert (results[0].into_stream, results[0].out_of_stream) == (14, 6)


async def test_pump_ends_a_session_left_half_closed(autojump_clock: trio.testing.MockClock) -> None:
    async with switched_stream() as (ours, theirs):
        near, far = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            results = []

            async def run_pump() -> None:
                results.append(await pump(theirs, near, half_close_timeout=30))

            nursery.start_soon(run_pump)
            await ours.send_end()  # one direction ends; the TCP peer never closes its own
            assert await far.receive_some() == b""
            await trio.sleep(3600)  # the other direction stays silent
        assert results[0].error is not None and "half-closed for 30 s" in results[0].error


async def test_an_idle_open_session_has_no_deadline(autojump_clock: trio.testing.MockClock) -> None:
    async with switched_stream() as (ours, theirs):
        near, far = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, theirs, near)
            await trio.sleep(3600)  # an hour of silence (mock clock): far beyond every timeout
            await far.send_all(b"still here")
            assert await ours.receive_data() == b"still here"
            nursery.cancel_scope.cancel()
