"""The agent's header rules against a real upstream (tests/e2e/upstream.py): override headers in any spelling a
framework may fold to the dashed one, and the plain ``host[:port]`` rule for Host. Every refusal is checked on
what the upstream saw: nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from protocol import RequestHead
from rtunnel.agent.allowlist import Allowlist
from tests.e2e.upstream import Upstream, open_upstream

from ..agent_harness import call, tunnel


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream() as up:
        yield up


# Servers that map headers to CGI/WSGI-style variables (HTTP_X_HTTP_METHOD_OVERRIDE) read "_" as "-".
FOLDED_OVERRIDES = [
    b"X_HTTP_METHOD_OVERRIDE",
    b"X_Original_URL",
    b"X_Rewrite_URL",
    b"X-HTTP-Method_Override",
    b"x_http_method",
    b"X-Method_Override",
    b"X-ORIGINAL-URL",
]


@pytest.mark.parametrize("name", FOLDED_OVERRIDES)
async def test_override_headers_are_refused_in_any_spelling(upstream: Upstream, name: bytes) -> None:
    async with tunnel(upstream.url, Allowlist.parse(["GET /bytes/*"])) as t:
        refused = await call(t.relay, b"GET", b"/bytes/3", headers=[(name, b"/admin")])
        ok = await call(t.relay, b"GET", b"/bytes/3", headers=[(b"X-HTTP-Methods", b"not an override")])
    assert refused.status == 400
    assert b"bypass the allowlist" in refused.body and name in refused.body
    assert ok.status == 200
    assert upstream.paths == ["/bytes/3"]


async def _with_host(relay: object, host: bytes) -> tuple[int, bytes]:
    stream = await relay.open_stream(  # type: ignore[attr-defined]
        RequestHead(b"GET", b"/bytes/3", ((b"Host", host),)), end_stream=True
    )
    head = await stream.receive_reply()
    body = b""
    while chunk := await stream.receive_data():
        body += chunk
    stream.close()
    return head.status, body


BAD_HOSTS = [
    b"evil.example:80:90",
    b"127.0.0.1%2fadmin",
    b"app.example%2F..%2Fadmin",
    b"app.example/admin",
    b"user@app.example",
    b"app.example:http",
    b"app.example:123456",
    b"[::1",
    b"[::1]x",
    b"[::1]:80:90",
    b"[fe80::1%25eth0]",
    b"app example",
    b"app.example,other.example",
    b"app.example;x=y",
    b":80",
]
GOOD_HOSTS = [
    b"app.example",
    b"app.example:8080",
    b"APP.example.:1",
    b"127.0.0.1",
    b"[::1]",
    b"[2001:db8::1]:443",
]


async def test_only_a_plain_host_and_port_is_forwarded(upstream: Upstream) -> None:
    async with tunnel(upstream.url, Allowlist.parse(["GET /bytes/*"])) as t:
        bad = [await _with_host(t.relay, host) for host in BAD_HOSTS]
        good = [await _with_host(t.relay, host) for host in GOOD_HOSTS]
    for host, (status, body) in zip(BAD_HOSTS, bad, strict=True):
        assert (status, b"invalid Host header" in body) == (400, True), host
    for host, (status, _) in zip(GOOD_HOSTS, good, strict=True):
        assert status == 200, host
    assert upstream.paths == ["/bytes/3"] * len(GOOD_HOSTS)
