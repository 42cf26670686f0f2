"""End to end: streams pass event by event, and nothing puts a deadline on a long-lived exchange.

No test measures time. Event-by-event delivery is shown by ordering: the upstream writes event k+1 only after
the client has read event k (tests/e2e/upstream.py ``/events/<key>``), so a tunnel that held event k back
(buffering, batching, waiting for more) would never deliver it, and the test would fail on its budget.
The no-deadline tests configure every timeout the relay and agent have at SHORT s and keep an exchange open,
idle, for several times that: they pass only if none of those timeouts applies to an exchange in progress.
SHORT is the one real-time margin: the pongs, request heads and response heads that must beat it cross three
processes, so it is kept well above what they may take on a loaded 2-core machine (3 s, the dead timeout
test_resilience also trusts). IDLE leaves a timer that did apply 1.5 SHORT to fire late.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio_websocket

from .procs import Agent, Relay, http_client, run_agent, run_relay
from .upstream import Upstream
from .wsupstream import WsUpstream, open_ws_upstream

pytestmark = pytest.mark.e2e

BUDGET = 60  # seconds for a whole test on a loaded machine; a tunnel that buffers hangs, then fails

# Every timeout of the relay and the agent, set low; IDLE is several times longer.
SHORT = "3"
SHORT_TIMEOUTS_RELAY = [
    "--idle-timeout",
    SHORT,
    "--head-timeout",
    SHORT,
    "--stall-timeout",
    SHORT,
    "--ping-interval",
    "0.25",
    "--dead-timeout",
    SHORT,
]
SHORT_TIMEOUTS_AGENT = ["--response-timeout", SHORT, "--ping-interval", "0.25", "--dead-timeout", SHORT]
IDLE = 2.5 * float(SHORT)


@asynccontextmanager
async def short_timeouts(token: str, upstream_url: str) -> AsyncIterator[tuple[Relay, Agent]]:
    async with (
        run_relay(token, extra_args=SHORT_TIMEOUTS_RELAY) as relay,
        run_agent(relay.agents_url, upstream_url, token=token, extra_args=SHORT_TIMEOUTS_AGENT) as agent,
    ):
        yield relay, agent


async def test_server_sent_events_pass_one_by_one(relay: Relay, agent: Agent, upstream: Upstream) -> None:
    key, count = uuid.uuid4().hex, 6
    with trio.fail_after(BUDGET):
        async with (
            http_client(relay.http_url) as client,
            client.stream("GET", f"/events/{key}?n={count}") as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            seen: list[str] = []
            buffer = ""
            async for text in response.aiter_text():
                buffer += text
                while "\n\n" in buffer:
                    event, buffer = buffer.split("\n\n", 1)
                    seen.append(event)
                    # Event k has reached the client; only now may the upstream write event k+1.
                    upstream.state.release(f"{key}.{len(seen) - 1}")
    assert seen == [f"id: {i}\ndata: event {i}" for i in range(count)]


async def test_chunks_of_a_long_poll_pass_one_by_one(relay: Relay, agent: Agent, upstream: Upstream) -> None:
    key = uuid.uuid4().hex
    with trio.fail_after(BUDGET):
        async with (
            http_client(relay.http_url) as client,
            client.stream("GET", f"/hold/{key}") as response,
        ):
            chunks = response.aiter_bytes()
            assert await chunks.__anext__() == b"held\n"  # delivered while the upstream still holds the rest
            upstream.state.release(key)
            assert b"".join([chunk async for chunk in chunks]) == b"released\n"


async def test_a_long_running_response_outlives_every_timeout(token: str, upstream: Upstream) -> None:
    key = uuid.uuid4().hex
    with trio.fail_after(BUDGET):
        async with (
            short_timeouts(token, upstream.url) as (relay, _),
            http_client(relay.http_url) as client,
            client.stream("GET", f"/hold/{key}") as response,
        ):
            chunks = response.aiter_bytes()
            assert await chunks.__anext__() == b"held\n"
            await trio.sleep(IDLE)  # the response is in progress and silent for longer than any timeout
            upstream.state.release(key)
            assert b"".join([chunk async for chunk in chunks]) == b"released\n"


async def test_relay_timeouts_do_not_apply_while_a_response_head_is_awaited(
    token: str, upstream: Upstream
) -> None:
    # The agent's --response-timeout (the time the upstream has to start answering) is the one deadline
    # before a response head; here it is generous while the relay's own are SHORT.
    agent_args = ["--response-timeout", "30"]
    with trio.fail_after(BUDGET):
        async with (
            run_relay(token, extra_args=SHORT_TIMEOUTS_RELAY) as relay,
            run_agent(relay.agents_url, upstream.url, token=token, extra_args=agent_args),
            http_client(relay.http_url) as client,
        ):
            response = await client.get(f"/sleep?s={IDLE}")
    assert (response.status_code, response.text) == (200, "slept\n")


async def test_the_response_timeout_ends_at_the_response_head(token: str, upstream: Upstream) -> None:
    # Contrast: an upstream that does not start its response within --response-timeout gets a 504.
    with trio.fail_after(BUDGET):
        async with short_timeouts(token, upstream.url) as (relay, _), http_client(relay.http_url) as client:
            response = await client.get(f"/sleep?s={IDLE}")
    assert response.status_code == 504


async def test_an_idle_websocket_outlives_every_timeout(token: str) -> None:
    key = uuid.uuid4().hex
    with trio.fail_after(BUDGET):
        ws_upstream: WsUpstream
        async with open_ws_upstream() as ws_upstream:
            upstream_url = f"http://127.0.0.1:{ws_upstream.port}"
            async with short_timeouts(token, upstream_url) as (relay, agent):
                url = f"ws://127.0.0.1:{relay.http_port}/ws/idle?key={key}"
                async with trio_websocket.open_websocket_url(url, connect_timeout=30) as ws:
                    await trio.sleep(IDLE)  # nothing crosses the session for longer than any timeout
                    ws_upstream.release(key)
                    assert await ws.get_message() == "still here"
                await ws_upstream.wait_sessions(1)
                await agent.wait_for_line("(switched protocols)")
    assert ws_upstream.sessions == [(f"/ws/idle?key={key}", 1000, None)]
