"""Requests the tunnel cannot carry, against real processes: once they froze the relay for good (100% CPU,
nobody served, the agent link lost). Each now gets its status, and the tunnel keeps serving.

`--max-head-size 0 --max-headers 0` disable the relay's own head limits, so only the wire format's are left.
"""

from __future__ import annotations

import pytest

from .procs import http_client, run_agent, run_relay
from .rawhttp import open_raw, request_bytes
from .upstream import Upstream

pytestmark = pytest.mark.e2e

CASES = [
    ("method of 256 octets", request_bytes("A" * 256, "/anything"), 501),
    ("header value of 70000 octets", request_bytes("GET", "/x", [("X-Big", "v" * 70_000)]), 431),
    ("target of 70000 octets", request_bytes("GET", "/" + "t" * 70_000), 414),
]


async def test_heads_the_tunnel_cannot_carry_are_refused_and_the_tunnel_stays_up(
    upstream: Upstream, token: str
) -> None:
    limits = ["--max-head-size", "0", "--max-headers", "0"]
    async with (
        run_relay(token, extra_args=limits) as relay,
        run_agent(relay.agents_url, upstream.url, token=token),
        http_client(relay.http_url) as client,
    ):
        for name, raw, status in CASES:
            async with open_raw(relay.http_port) as conn:
                await conn.send(raw)
                response = await conn.response()
                assert response.status == status, name
                assert await conn.closed(), name
            served = await client.get("/after")
            assert served.status_code == 200, name
    assert "/anything" not in upstream.paths
