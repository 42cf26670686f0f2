"""A compromised agent against the real relay (rtunnel/conformance/peers.py, HostileAgent): it authenticates with a valid
token, then sends oversized frames, floods resets, opens streams it may not open, lies about windows or never
reads. The relay survives, closes that agent with the specified error code (the GOAWAY code is in the relay's
log), and an honest agent on the same relay keeps serving, including an exchange in progress the whole time.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest
import trio

from protocol import ErrorCode, RequestHead, Settings, encode_request_head
from rtunnel.conformance.peers import (
    DATA,
    OPEN,
    RESET,
    WINDOW_UPDATE,
    HostileAgent,
    frame,
    hostile_agent,
    u32,
)
from rtunnel.relay.server import FRAME_SIZE, STREAM_WINDOW

from ..trio_helpers import wait_until
from .procs import Relay, http_client, run_agent, run_relay
from .upstream import Upstream

pytestmark = pytest.mark.e2e

RELAY_ARGS = ["--stall-timeout", "1", "--dead-timeout", "4", "--ping-interval", "1", "--agent-wait", "10"]
REPLY = 2


@dataclass
class Rig:
    relay: Relay
    client: httpx.AsyncClient
    token: str
    upstream: Upstream
    nursery: trio.Nursery

    async def honest_still_serves(self, tag: str) -> None:
        for i in range(3):
            r = await self.client.get(f"/honest/{tag}/{i}")
            assert (r.status_code, r.text) == (200, f"/honest/{tag}/{i}")

    @asynccontextmanager
    async def hostile(self, settings: Settings | None = None) -> AsyncIterator[HostileAgent]:
        """A hostile agent, once the relay has it in its table (so requests may be routed to it)."""
        mark = self.relay.mark()
        async with hostile_agent(self.relay.agents_url, self.token, settings=settings) as bad:
            await self.relay.wait_for_line("agent connected", since=mark)
            yield bad

    async def wait_disconnect(self, code: str, *, since: int) -> None:
        await self.relay.wait_for_line(re.compile(rf"disconnected: .*sent GOAWAY {code}"), since=since)


@asynccontextmanager
async def rig(upstream: Upstream, token: str) -> AsyncIterator[Rig]:
    """A relay, an honest agent, and an exchange held open through the honest agent for the whole test (so
    it counts as busy, and every new request goes to the hostile agent, the least loaded one)."""
    async with (
        run_relay(token, extra_args=RELAY_ARGS) as relay,
        run_agent(relay.agents_url, upstream.url, token=token),
        http_client(relay.http_url) as client,
        trio.open_nursery() as nursery,
    ):
        await relay.wait_for_line("agent connected")  # so later waits for that line see only hostile agents
        held = trio.Event()
        done: list[bytes] = []

        async def hold() -> None:
            async with client.stream("GET", "/hold/long") as r:
                chunks = r.aiter_raw()
                assert await anext(chunks) == b"held\n"
                held.set()
                done.extend([chunk async for chunk in chunks])

        nursery.start_soon(hold)
        await held.wait()
        yield Rig(relay, client, token, upstream, nursery)
        # The exchange in progress through the honest agent survived every attack.
        await client.post("/release/long")
        await wait_until(lambda: done, within=15)
        assert b"".join(done) == b"released\n"


async def test_oversized_frame_is_frame_size_error(upstream: Upstream, token: str) -> None:
    async with rig(upstream, token) as t:
        mark = t.relay.mark()
        async with t.hostile() as bad:
            # An unknown frame type still counts against MAX_FRAME_SIZE (the relay's): judged from its header.
            await bad.send(frame(0x20, 0, 0, bytes(FRAME_SIZE + 1)))
            assert await bad.goaway_code() is ErrorCode.FRAME_SIZE_ERROR
            await bad.wait_closed()
        await t.wait_disconnect("FRAME_SIZE_ERROR", since=mark)
        await t.honest_still_serves("a")


async def test_opening_streams_it_may_not_open_ends_in_enhance_your_calm(
    upstream: Upstream, token: str
) -> None:
    async with rig(upstream, token) as t:
        mark = t.relay.mark()
        async with t.hostile() as bad:
            # The relay grants agents MAX_CONCURRENT_STREAMS 0: each OPEN is refused ...
            head = encode_request_head(RequestHead(b"GET", b"/", ()))
            await bad.send(frame(OPEN, 1, 1, head))
            refused = await bad.wait_for(RESET)
            assert (refused.stream_id, refused.error_code) == (1, ErrorCode.REFUSED_STREAM)
            # ... and a flood of them is a reset flood (SPEC 11: burst 1000).
            await bad.send(*(frame(OPEN, 1, sid, head) for sid in range(3, 2400, 2)))
            assert await bad.goaway_code() is ErrorCode.ENHANCE_YOUR_CALM
        await t.wait_disconnect("ENHANCE_YOUR_CALM", since=mark)
        mark = t.relay.mark()
        async with t.hostile() as bad:
            # An OPEN with the relay's own (even) parity is a protocol error outright.
            await bad.send(frame(OPEN, 1, 2, head))
            assert await bad.goaway_code() is ErrorCode.PROTOCOL_ERROR
        await t.wait_disconnect("PROTOCOL_ERROR", since=mark)
        await t.honest_still_serves("b")


async def test_reset_flood_is_enhance_your_calm_and_the_request_is_retried(
    upstream: Upstream, token: str
) -> None:
    async with rig(upstream, token) as t:
        mark = t.relay.mark()
        async with t.hostile() as bad:
            result: list[httpx.Response] = []

            async def victim() -> None:
                result.append(await t.client.get("/victim"))

            t.nursery.start_soon(victim)
            opened = await bad.wait_for(OPEN)  # the least-loaded agent got it
            await bad.send(*(frame(RESET, 0, opened.stream_id, u32(ErrorCode.CANCEL)) for _ in range(1200)))
            assert await bad.goaway_code() is ErrorCode.ENHANCE_YOUR_CALM
        await t.wait_disconnect("ENHANCE_YOUR_CALM", since=mark)
        # The hostile agent cancelled the GET before answering: the relay sent it to the honest agent.
        await wait_until(lambda: result, within=15)
        assert (result[0].status_code, result[0].text) == (200, "/victim")
        await t.honest_still_serves("c")


async def test_lying_about_windows(upstream: Upstream, token: str) -> None:
    async with rig(upstream, token) as t:
        # 1. More DATA than the relay's stream window: that stream is reset with FLOW_CONTROL_ERROR.
        async with t.hostile() as bad:
            result: list[BaseException | httpx.Response] = []

            async def victim() -> None:
                try:
                    result.append(await t.client.get("/victim-1"))
                except httpx.HTTPError as exc:
                    result.append(exc)  # the head went out, then the body was cut: the client sees an error

            t.nursery.start_soon(victim)
            opened = await bad.wait_for(OPEN)
            sid = opened.stream_id
            reply = b"\x00\xc8\x02OK\x00\x00"  # 200 OK, no headers
            frames_over = STREAM_WINDOW // 16384 + 1  # one frame more than the relay's stream window
            too_much = [frame(DATA, 0, sid, bytes(16384)) for _ in range(frames_over)]
            await bad.send(frame(REPLY, 0, sid, reply), *too_much)
            reset = await bad.wait_for(RESET)
            assert (reset.stream_id, reset.error_code) == (sid, ErrorCode.FLOW_CONTROL_ERROR)
            await wait_until(lambda: result, within=15)
            assert not isinstance(result[0], httpx.Response) or result[0].status_code != 200
            # 2. A WINDOW_UPDATE past 2^31-1 on the connection: connection error FLOW_CONTROL_ERROR.
            mark = t.relay.mark()
            await bad.send(frame(WINDOW_UPDATE, 0, 0, u32(2**31 - 1)))
            assert await bad.goaway_code() is ErrorCode.FLOW_CONTROL_ERROR
        await t.wait_disconnect("FLOW_CONTROL_ERROR", since=mark)
        # 3. A window that never opens: the relay's request body cannot leave; the stall reaper resets the
        # stream after --stall-timeout (1 s here) instead of holding the client forever.
        mark = t.relay.mark()
        async with t.hostile(Settings(initial_stream_window=0)) as bad:
            posted: list[httpx.Response] = []

            async def upload() -> None:
                posted.append(await t.client.post("/upload", content=b"x" * 1000))

            t.nursery.start_soon(upload)
            opened = await bad.wait_for(OPEN)
            reset = await bad.wait_for(RESET)  # wait_for answers the relay's pings meanwhile
            assert (reset.stream_id, reset.error_code) == (opened.stream_id, ErrorCode.CANCEL)
            await wait_until(lambda: posted, within=15)
            assert posted[0].status_code == 502  # a POST that may have been processed is never resent
        await t.relay.wait_for_line("granted no window", since=mark)
        await t.honest_still_serves("d")
    assert "/upload" not in upstream.paths


async def test_an_agent_that_never_reads_is_dropped_and_its_request_goes_elsewhere(
    upstream: Upstream, token: str
) -> None:
    async with rig(upstream, token) as t:
        mark = t.relay.mark()
        async with t.hostile() as bad:
            # From here on it neither reads nor sends: the relay's pings go unanswered, its sends pile up.
            r = await t.client.get("/to-the-silent-one")
            assert (r.status_code, r.text) == (200, "/to-the-silent-one")
            assert [f.type for f in bad.received] == [0]  # it read nothing after the HELLO
        await t.relay.wait_for_line(re.compile("disconnected: .*no data from the peer"), since=mark)
        # The GET went to the silent agent first (the least loaded) and was resent once its link was declared
        # dead: nothing of it had been processed.
        assert t.relay.count_lines("retrying GET", since=mark) == 1
        await t.honest_still_serves("e")
