"""A compromised relay against the real `rtunnel dial`: the agent's allowlist, and its abuse limits, hold even
when every frame it receives is chosen by an attacker (rtunnel/conformance/peers.py, HostileRelay).

The relay here is a scripted WebSocket server speaking rtunnel.v1; it skips every check the real relay makes,
so whatever reaches the upstream got past the agent alone.
"""

from __future__ import annotations

import signal
from contextlib import AbstractAsyncContextManager

import pytest

from protocol import ErrorCode, RequestHead, StreamReset
from rtunnel.conformance.peers import (
    DATA,
    END_STREAM,
    WINDOW_UPDATE,
    HostileLink,
    HostileRelay,
    frame,
    hostile_relay,
    u32,
)
from rtunnel.http.target import normalize_target

from .procs import Agent, run_agent
from .upstream import Upstream

pytestmark = pytest.mark.e2e

RULES = ["GET /api/**", "POST /api/upload"]

# (method, target, statuses the agent may answer with). None: forwarded, in normalized form.
HOSTILE_TARGETS: list[tuple[bytes, bytes, set[int]]] = [
    (b"GET", b"/admin", {403}),
    (b"GET", b"/api/../admin", {403}),
    (b"GET", b"/api/%2e%2e/admin", {403}),
    (b"GET", b"/api/%2E./admin", {403}),
    (b"GET", b"/api/.%2E/admin", {403}),
    (b"GET", b"/api/x/../../admin", {403}),
    (b"GET", b"/api/../../etc/passwd", {400}),
    (b"GET", b"/api%2fadmin", {400}),
    (b"GET", b"/api/%2F../admin", {400}),
    (b"GET", b"/api/%2f%2e%2e%2fadmin", {400}),
    (b"GET", b"/api\\..\\admin", {400}),
    (b"GET", b"/api/%5c..%5cadmin", {400}),
    (b"GET", b"/api/..;/admin", {400}),
    (b"GET", b"//admin", {403}),
    (b"GET", b"///api/../admin", {403}),
    (b"GET", b"http://internal.example/api/x", {400}),
    (b"GET", b"//internal.example/admin", {403}),
    (b"GET", b"internal.example:80", {400}),
    (b"GET", b"*", {400}),
    (b"OPTIONS", b"*", {400}),
    (b"CONNECT", b"internal.example:443", {400, 403}),
    (b"GET", b"/api/x\x00/../../admin", {400}),
    (b"GET", b"/api/%00", {400}),
    (b"GET", b"/api/x\r\nX-Injected: 1", {400}),
    (b"GET", b"/api/\x7f", {400}),
    (b"GET", b"/api/x#/../../admin", {400}),
    (b"GET", b"/api/" + b"a" * 10_000, {414}),
    (b"get", b"/api/x", {403}),
    (b"GeT", b"/api/x", {403}),
    (b"GET ", b"/api/x", {400}),
    (b"G\x00ET", b"/api/x", {400}),
    (b"POST", b"/api/upload/../../admin", {403}),
    (b"POST", b"/api/x", {403}),
    (b"DELETE", b"/api/x", {403}),
]

# Allowed, but only in the normalized form: (target sent, target the upstream must see).
NORMALIZED: list[tuple[bytes, bytes]] = [
    (b"/api/./x/../y", b"/api/y"),
    (b"/api//z", b"/api/z"),
    (b"/api/%7Euser", b"/api/~user"),
    (b"/api/%41%42", b"/api/AB"),
    (b"/api/%252e%252e/admin", b"/api/%252e%252e/admin"),  # double encoding stays data
    (b"/api/q?x=/../admin&y=%2f", b"/api/q?x=/../admin&y=%2f"),  # the query is not a path
]


def _agent(relay: HostileRelay, upstream: Upstream) -> AbstractAsyncContextManager[Agent]:
    # --grace 0: the scripted relay never closes after a GOAWAY, so a drain would only wait.
    return run_agent(
        relay.url, upstream.url, token=None, allow=RULES, wait_connected=False, extra_args=["--grace", "0"]
    )


async def _closed_by_the_agent(relay: HostileRelay, link: HostileLink) -> None:
    """Wait for the agent's WebSocket Close, then drop the connection as a real relay closes it after the
    Close handshake: the scripted relay keeps it open, and the agent would wait out its 5 s close timeout."""
    await link.wait_closed()
    relay.release(link)


async def _stop(agent: Agent, relay: HostileRelay, link: HostileLink) -> None:
    """SIGTERM: the agent says GOAWAY, closes the link, and exits 0."""
    agent.send_signal(signal.SIGTERM)
    await _closed_by_the_agent(relay, link)
    assert await agent.wait_exit() == 0


def _within_rules(path: str) -> bool:
    raw = path.encode("latin-1")
    normalized = normalize_target(raw)
    return (
        getattr(normalized, "target", None) == raw  # seen exactly in normalized form
        and raw.split(b"?", 1)[0].startswith(b"/api/")
    )


async def test_a_hostile_relay_reaches_nothing_outside_the_allowlist(upstream: Upstream) -> None:
    async with hostile_relay() as relay, _agent(relay, upstream) as agent:
        link = await relay.accept()
        for method, target, expected in HOSTILE_TARGETS:
            status, body = await link.request(method, target)
            assert status in expected, (method, target, status, body)
        for target, seen in NORMALIZED:
            status, body = await link.request(b"GET", target)
            assert status == 200, (target, status, body)
            assert body == seen  # the upstream echoes the request-target it received
        assert agent.returncode is None
        await _stop(agent, relay, link)
    assert upstream.paths, "the allowed requests must have reached the upstream"
    outside = [p for p in upstream.paths if not _within_rules(p)]
    assert not outside, f"the upstream saw paths outside the rules: {outside}"
    assert sorted(upstream.paths) == sorted(seen.decode() for _, seen in NORMALIZED)


async def test_a_ping_flood_gets_enhance_your_calm_and_the_agent_reconnects(upstream: Upstream) -> None:
    async with hostile_relay() as relay, _agent(relay, upstream) as agent:
        link = await relay.accept()
        # SPEC 11: burst 50; a hundred pings in one message is a flood by any clock.
        await link.inject(*(frame(7, 0, 0, i.to_bytes(8, "big")) for i in range(100)))
        assert await link.goaway_code() is ErrorCode.ENHANCE_YOUR_CALM
        await _closed_by_the_agent(relay, link)
        # The agent process survives the offender and dials again; the new link serves normally.
        again = await relay.accept()
        assert await again.request(b"GET", b"/api/after-flood") == (200, b"/api/after-flood")
        assert await again.request(b"GET", b"/admin") == (403, (await _denial(b"/admin")))
        assert agent.returncode is None
        await _stop(agent, relay, again)
    assert upstream.paths == ["/api/after-flood"]


async def _denial(path: bytes) -> bytes:
    return b"rtunnel agent: GET " + path + b" is not allowed here (no allow rule matches)\n"


async def test_data_past_the_window_is_refused_and_a_window_overflow_closes_the_link(
    upstream: Upstream,
) -> None:
    async with hostile_relay() as relay, _agent(relay, upstream) as agent:
        link = await relay.accept()
        window = link.conn.peer_settings.initial_stream_window  # type: ignore[union-attr]
        size = window + 16384
        # An upload the agent accepts, then more DATA than it granted, all in one message: the agent
        # must refuse the stream with FLOW_CONTROL_ERROR rather than buffer past its window.
        headers = ((b"Content-Length", str(size).encode()),)
        stream_id = link.conn.open_stream(RequestHead(b"POST", b"/api/upload", ((b"Host", b"app"), *headers)))
        chunks = [frame(DATA, 0, stream_id, bytes(16384)) for _ in range(size // 16384)]
        chunks[-1] = frame(DATA, END_STREAM, stream_id, bytes(16384))
        await link.inject(*chunks)
        reset = await link.wait_event(StreamReset, stream_id)
        assert isinstance(reset, StreamReset)
        assert reset.error_code is ErrorCode.FLOW_CONTROL_ERROR
        # The link itself is fine: a stream error stays a stream error.
        assert await link.request(b"GET", b"/api/still-fine") == (200, b"/api/still-fine")
        # A WINDOW_UPDATE that pushes the connection window past 2^31-1 is a connection error.
        await link.inject(frame(WINDOW_UPDATE, 0, 0, u32(2**31 - 1)))
        assert await link.goaway_code() is ErrorCode.FLOW_CONTROL_ERROR
        await _closed_by_the_agent(relay, link)
        again = await relay.accept()
        assert await again.request(b"GET", b"/api/after") == (200, b"/api/after")
        assert agent.returncode is None
        await _stop(agent, relay, again)
    assert all(_within_rules(p) for p in upstream.paths), upstream.paths
