"""The relay's limits, set through `rtunnel serve` options, against one abusive client address while another
client keeps working: exceeding a limit affects only the offender.

The offender connects from 127.0.0.2 and the honest client from 127.0.0.1 (Linux routes all of 127/8 to the
loopback interface), so the per-address limits tell them apart.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from ..ports import connect_from
from .procs import http_client, run_agent, run_relay
from .rawhttp import RawClient
from .upstream import Upstream

pytestmark = pytest.mark.e2e

OFFENDER = "127.0.0.2"
LIMITS = [
    "--max-connections-per-ip", "4",
    "--max-exchanges-per-ip", "2",
    "--head-timeout", "2",
    "--max-body-size", "1000",
    "--max-head-size", "4096",
]  # fmt: skip


@asynccontextmanager
async def raw_from(source: str, port: int) -> AsyncIterator[RawClient]:
    """A raw HTTP connection to the relay from a chosen loopback source address."""
    async with await connect_from(source, port) as stream:
        yield RawClient(stream)


async def test_slowloris_and_a_connection_flood_only_hurt_the_offender(
    upstream: Upstream, token: str
) -> None:
    async with (
        run_relay(token, extra_args=LIMITS) as relay,
        run_agent(relay.agents_url, upstream.url, token=token),
        http_client(relay.http_url) as honest,
        AsyncExitStack() as stack,
    ):
        # Four slowloris connections: each sends part of a head and stops.
        slow = [await stack.enter_async_context(raw_from(OFFENDER, relay.http_port)) for _ in range(4)]
        for conn in slow:
            await conn.send(b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Trickle: ")
        # The fifth connection from the same address is over --max-connections-per-ip: 503 at once.
        async with raw_from(OFFENDER, relay.http_port) as flood:
            response = await flood.response()
            assert response.status == 503
            assert await flood.closed()
        # Meanwhile the honest client is served as usual.
        for i in range(5):
            assert (await honest.get(f"/honest/{i}")).status_code == 200
        # At --head-timeout each slowloris connection gets 408 and is closed.
        for conn in slow:
            response = await conn.response()
            assert response.status == 408
            assert await conn.closed()
        # Its slots are free again: the offender's address is served once it behaves.
        with trio.fail_after(15):
            while True:
                async with raw_from(OFFENDER, relay.http_port) as again:
                    await again.send(b"GET /behaving HTTP/1.1\r\nHost: a\r\n\r\n")
                    if (await again.response()).status == 200:
                        break
                await trio.sleep(0.05)  # the relay frees a slot just after the 408's close
        assert relay.count_lines(re.compile(r"connection limit \(per key\)")) == 1  # logged once
    assert "/slow" not in upstream.paths
    assert [p for p in upstream.paths if p.startswith("/honest/")] == [f"/honest/{i}" for i in range(5)]


async def test_exchange_body_and_head_limits_answer_the_offender_only(upstream: Upstream, token: str) -> None:
    async with (
        run_relay(token, extra_args=LIMITS) as relay,
        run_agent(relay.agents_url, upstream.url, token=token),
        http_client(relay.http_url) as honest,
        AsyncExitStack() as stack,
    ):
        # Each connection opens just before its request: opened earlier, it could meet the 2 s --head-timeout
        # while the exchanges before it cross a loaded machine.
        # Two long exchanges in progress from the offender's address ...
        for key in (b"a", b"b"):
            conn = await stack.enter_async_context(raw_from(OFFENDER, relay.http_port))
            await conn.send(b"GET /hold/" + key + b" HTTP/1.1\r\nHost: a\r\n\r\n")
            await conn.read_until(b"held\n")
        # ... so a third is over --max-exchanges-per-ip: 429 with Retry-After; the honest client goes on.
        third = await stack.enter_async_context(raw_from(OFFENDER, relay.http_port))
        await third.send(b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n")
        response = await third.response()
        assert response.status == 429
        assert response.get("Retry-After") is not None
        assert (await honest.get("/honest")).status_code == 200
        # Body and head limits: 413 and 431, for the offender only.
        await third.send(b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001)
        assert (await third.response("POST")).status == 413
        assert (await honest.post("/sha256", content=b"x" * 1000)).status_code == 200
        async with raw_from(OFFENDER, relay.http_port) as conn:
            await conn.send(b"GET /h HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 5000 + b"\r\n\r\n")
            assert (await conn.response()).status == 431
        for key in ("a", "b"):
            assert (await honest.post(f"/release/{key}")).status_code == 200
    assert not {"/third", "/big", "/h"} & set(upstream.paths)


async def test_an_agent_runs_at_most_max_streams_exchanges_at_once(upstream: Upstream, token: str) -> None:
    async with (
        run_relay(token, extra_args=["--agent-wait", "0.5"]) as relay,
        run_agent(relay.agents_url, upstream.url, token=token, extra_args=["--max-streams", "1"]),
        http_client(relay.http_url) as c,
    ):
        async with c.stream("GET", "/hold/only") as held:
            chunks = held.aiter_raw()
            assert await anext(chunks) == b"held\n"
            # The agent granted the relay one stream: a second exchange waits --agent-wait, then 503.
            r = await c.get("/second")
            assert r.status_code == 503
            assert "concurrent-stream limit" in r.text
            assert (await c.post("/release/only")).status_code == 503  # the same limit, for any request
            upstream.state.release("only")
            assert b"".join([chunk async for chunk in chunks]) == b"released\n"
        assert (await c.get("/third")).status_code == 200
    assert "/second" not in upstream.paths
