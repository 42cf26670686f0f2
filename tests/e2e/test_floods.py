"""Floods from one address do not hurt clients and agents from another, with the relay's default limits.

The offender is 127.0.0.2, everyone else 127.0.0.1 (Linux routes all of 127/8 to loopback). The tests assert
outcomes (served, connected, refused); the latencies they measure are printed, and bench/floods.py holds
them to the one-second bound.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from ..trio_helpers import wait_until
from .procs import http_client, run_agent, run_relay
from .rawhttp import RawClient
from .test_resilience import note
from .test_security_limits import OFFENDER, raw_from
from .upstream import Upstream

pytestmark = pytest.mark.e2e

SLOWLORIS = 300  # more connections than --max-connections-per-ip (256) allows one address


@asynccontextmanager
async def slowloris(port: int, count: int = SLOWLORIS) -> AsyncIterator[list[RawClient]]:
    """`count` connections from OFFENDER, each trickling a request head that never ends."""
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        conns = [await stack.enter_async_context(raw_from(OFFENDER, port)) for _ in range(count)]

        async def trickle(conn: RawClient) -> None:
            try:
                await conn.send(b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Trickle: ")
                while True:
                    await trio.sleep(0.5)
                    await conn.send(b"x")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # refused (over the limit) or closed at the head timeout

        for conn in conns:
            nursery.start_soon(trickle, conn)
        yield conns
        nursery.cancel_scope.cancel()


async def normal_latencies(url: str, n: int = 20) -> list[float]:
    """Durations of `n` sequential requests from 127.0.0.1, each on a new connection; each must be 200."""
    times = []
    async with http_client(url, headers={"Connection": "close"}) as client:
        for i in range(n):
            started = trio.current_time()
            response = await client.get(f"/normal/{i}")
            assert response.status_code == 200, response.text
            times.append(trio.current_time() - started)
    return times


async def test_a_slowloris_flood_from_one_address_does_not_shut_out_another(
    upstream: Upstream, token: str
) -> None:
    async with (
        run_relay(token) as relay,
        run_agent(relay.agents_url, upstream.url, token=token),
    ):
        baseline = await normal_latencies(relay.http_url)
        async with slowloris(relay.http_port) as conns:
            during = await normal_latencies(relay.http_url)
            # The connections over the per-address limit were refused at once, the others are held.
            refused = 0
            for conn in conns[-(SLOWLORIS - 256) :]:
                response = await conn.response()
                assert response.status == 503
                refused += 1
        note(f"normal requests: max {max(baseline) * 1000:.0f} ms alone, {max(during) * 1000:.0f} ms during a "
             f"{SLOWLORIS}-connection slowloris flood from another address ({refused} refused with 503)")  # fmt: skip
    assert relay.count_lines("connection limit (per key)") == 1


def _upgrade(token: str) -> bytes:
    return (
        b"GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: rtunnel.v1\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n"
    )


async def _handshake(source: str, port: int, token: str) -> int:
    """One agent handshake from `source`: the status the relay answered (0: closed without one)."""
    async with raw_from(source, port) as conn:
        try:
            await conn.send(_upgrade(token))
            head = await conn.read_until(b"\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, AssertionError):
            return 0
        return int(head.split(b" ", 2)[1])


@asynccontextmanager
async def wrong_token_flood(port: int, loops: int = 20) -> AsyncIterator[dict[int, int]]:
    """`loops` concurrent clients from OFFENDER trying wrong tokens as fast as the relay answers."""
    statuses: dict[int, int] = {}
    async with trio.open_nursery() as nursery:

        async def loop() -> None:
            while True:
                status = await _handshake(OFFENDER, port, "wrong-token")
                statuses[status] = statuses.get(status, 0) + 1
                await trio.lowlevel.checkpoint()

        for _ in range(loops):
            nursery.start_soon(loop)
        yield statuses
        nursery.cancel_scope.cancel()


async def agent_handshake_latencies(port: int, token: str, n: int = 10) -> list[float]:
    times = []
    for _ in range(n):
        started = trio.current_time()
        assert await _handshake("127.0.0.1", port, token) == 101
        times.append(trio.current_time() - started)
    return times


async def test_a_wrong_token_flood_from_one_address_does_not_delay_an_agent_from_another(
    upstream: Upstream, token: str
) -> None:
    async with run_relay(token) as relay:
        port = int(relay.agents_url.rsplit(":", 1)[1])
        baseline = await agent_handshake_latencies(port, token)
        async with wrong_token_flood(port) as statuses:
            await wait_until(lambda: sum(statuses.values()) >= 200, within=15, interval=0.05)  # under way
            during = await agent_handshake_latencies(port, token)
            # A real agent from another address connects and serves, flood or not.
            async with (
                run_agent(relay.agents_url, upstream.url, token=token),
                http_client(relay.http_url) as client,
            ):
                assert (await client.get("/through")).status_code == 200
        note(f"agent handshakes: max {max(baseline) * 1000:.0f} ms alone, {max(during) * 1000:.0f} ms during a "
             f"wrong-token flood from another address ({dict(sorted(statuses.items()))})")  # fmt: skip
    assert statuses.get(401, 0) == 5  # the throttle's limit; the rest were refused without a token check
    assert statuses.get(429, 0) + statuses.get(0, 0) == sum(statuses.values()) - 5
    assert relay.count_lines("failed agent authentications from 127.0.0.2") == 1
