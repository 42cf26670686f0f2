"""Hostile request-targets through the real relay and agent: each is refused (by the relay's parser or by the
agent's allowlist) or forwarded only in the normalized form that was checked, and the upstream records that
it never saw a path outside the rules. (tests/e2e/test_security_hostile_relay.py sends the same kind of
targets straight from a compromised relay, which proves the agent alone enforces them.)
"""

from __future__ import annotations

import pytest

from rtunnel.http.target import NormalizedTarget, normalize_target

from .procs import Relay, run_agent
from .rawhttp import open_raw
from .upstream import Upstream

pytestmark = pytest.mark.e2e

RULES = ["GET /api/**", "POST /api/orders"]
REFUSED = {400, 403, 405, 414, 431}

HOSTILE: list[tuple[bytes, bytes]] = [
    (b"GET", b"/admin"),
    (b"GET", b"/api/../admin"),
    (b"GET", b"/api/%2e%2e/admin"),
    (b"GET", b"/api/%2E%2e/admin"),
    (b"GET", b"/api/.%2E/admin"),
    (b"GET", b"/api/..%2fadmin"),
    (b"GET", b"/api%2F..%2Fadmin"),
    (b"GET", b"/api%2fadmin"),
    (b"GET", b"/api\\..\\admin"),
    (b"GET", b"/api/..\\admin"),
    (b"GET", b"/api/%5C..%5Cadmin"),
    (b"GET", b"//admin"),
    (b"GET", b"/api/..;/admin"),
    (b"GET", b"http://internal.example/admin"),
    (b"GET", b"http://internal.example/api/x"),  # absolute-form naming another host, even under /api/
    (b"GET", b"https://internal.example:8443/api/x"),
    (b"CONNECT", b"internal.example:443"),
    (b"OPTIONS", b"*"),
    (b"GET", b"*"),
    (b"GET", b"/api/" + b"a" * 9000),  # over the agent's 8 KiB target limit: 414
    (b"GET", b"/api/" + b"a" * 40_000),  # over the relay's head limit: 431
    (b"GET", b"/api/%00"),
    (b"GET", b"/api/%0d%0aX-Injected:%201"),
    (b"GET", b"/api/\x01"),
    (b"GET", b"/api/\x7f"),
    (b"GET", b"/api/x\x00/../../admin"),
    (b"GET", b"/api/x\t/../../admin"),
    (b"get", b"/api/x"),
    (b"Get", b"/api/x"),
    (b"POST", b"/api/x"),
    (b"POST", b"/api/orders/../../admin"),
    (b"DELETE", b"/api/orders"),
]

NORMALIZED: list[tuple[bytes, bytes]] = [
    (b"/api/./items/../x", b"/api/x"),
    (b"/api//items", b"/api/items"),
    (b"/ap%69/z", b"/api/z"),
    (b"/api/%7Euser", b"/api/~user"),
]


def _outside_rules(path: str) -> bool:
    normalized = normalize_target(path.encode("latin-1"))
    if not isinstance(normalized, NormalizedTarget) or normalized.target != path.encode("latin-1"):
        return True  # not in the exact normalized form that was checked
    return not normalized.path.startswith(b"/api/")


async def _ask(relay: Relay, method: bytes, target: bytes) -> tuple[int, bytes]:
    async with open_raw(relay.http_port) as raw:
        await raw.send(
            method + b" " + target + b" HTTP/1.1\r\nHost: app.example\r\nContent-Length: 0\r\n\r\n"
        )
        response = await raw.response(method.decode("latin-1"))
        return response.status, response.body


async def test_hostile_targets_never_reach_the_upstream(relay: Relay, upstream: Upstream, token: str) -> None:
    async with run_agent(relay.agents_url, upstream.url, token=token, allow=RULES):
        for method, target in HOSTILE:
            status, body = await _ask(relay, method, target)
            assert status in REFUSED, (method, target[:80], status, body[:200])
        for target, seen in NORMALIZED:
            assert await _ask(relay, b"GET", target) == (200, seen)
    assert sorted(upstream.paths) == sorted(seen.decode() for _, seen in NORMALIZED)
    assert not [p for p in upstream.paths if _outside_rules(p)]
