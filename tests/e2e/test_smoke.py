"""Smoke tests of the real product through the e2e helpers: also the usage examples for the fixtures."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from ..faultproxy import open_fault_proxy
from .procs import Relay, http_client, relay_ports, run_agent, run_relay
from .upstream import Upstream, payload_sha256

pytestmark = pytest.mark.e2e

QUICK_BACKOFF = ["--backoff-initial", "0.1", "--backoff-cap", "0.5"]


async def test_download_and_upload_through_the_tunnel(client: httpx.AsyncClient) -> None:
    n = 5 * 1024 * 1024 + 7
    async with client.stream("GET", f"/bytes/{n}") as r:
        assert r.status_code == 200
        digest = hashlib.sha256()
        async for chunk in r.aiter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == payload_sha256(n)
    r = await client.post("/sha256", content=b"x" * 100_000)
    assert r.json()["length"] == 100_000


async def test_denied_path_never_reaches_upstream(relay: Relay, upstream: Upstream, token: str) -> None:
    async with (
        run_agent(relay.agents_url, upstream.url, token=token, allow=["GET /ok"]),
        http_client(relay.http_url) as c,
    ):
        assert (await c.get("/ok")).status_code == 200
        assert (await c.get("/secret")).status_code == 403
    assert upstream.paths == ["/ok"]


async def test_agent_reconnects_after_relay_kill_and_restart(upstream: Upstream, token: str) -> None:
    with relay_ports() as ports:
        async with (
            run_relay(token, **ports) as relay,
            # A short backoff: the agent is back as soon as the new relay listens, not seconds later.
            run_agent(relay.agents_url, upstream.url, token=token, extra_args=QUICK_BACKOFF) as agent,
        ):
            mark = agent.mark()
            relay.kill()
            async with run_relay(token, **ports) as again:
                await agent.wait_connected(since=mark)
                async with http_client(again.http_url) as c:
                    assert (await c.get("/after")).status_code == 200


async def test_agent_through_fault_proxy_survives_a_cut(upstream: Upstream, token: str) -> None:
    async with (
        run_relay(token) as relay,
        open_fault_proxy("127.0.0.1", relay.agents_port) as proxy,
        run_agent(f"ws://127.0.0.1:{proxy.port}", upstream.url, token=token) as agent,
    ):
        mark = agent.mark()
        proxy.cut()
        await agent.wait_connected(since=mark)
        await proxy.wait_accepted(2)
        async with http_client(relay.http_url) as c:
            assert (await c.get("/after-cut")).status_code == 200
