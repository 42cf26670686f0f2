"""Floods from one address against a relay with its default limits: how much they delay everyone else.

    python bench/floods.py

A slowloris flood (300 connections trickling endless request heads, more than --max-connections-per-ip allows)
and a wrong-token flood (20 clients guessing tokens as fast as the relay answers) come from 127.0.0.2; normal
requests and agent handshakes from 127.0.0.1 are timed before and during each. Exit 0 only when no normal
request or handshake took a second longer during the flood than the slowest one without it. The scenarios are
tests/e2e/test_floods.py's, which asserts their outcomes in the suite without timing them.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.procs import run_agent, run_relay
from tests.e2e.test_floods import (
    SLOWLORIS,
    agent_handshake_latencies,
    normal_latencies,
    slowloris,
    wrong_token_flood,
)
from tests.e2e.upstream import open_upstream

BOUND = 1.0  # seconds a flood from one address may add to another address's request


async def main() -> int:
    token = "flood-" + secrets.token_urlsafe(16)
    rows: list[tuple[str, float, float]] = []
    async with (
        open_upstream() as upstream,
        run_relay(token) as relay,
        run_agent(relay.agents_url, upstream.url, token=token),
    ):
        alone = await normal_latencies(relay.http_url, 50)
        async with slowloris(relay.http_port):
            during = await normal_latencies(relay.http_url, 50)
        rows.append((f"HTTP request, {SLOWLORIS}-connection slowloris flood", max(alone), max(during)))
        port = int(relay.agents_url.rsplit(":", 1)[1])
        alone = await agent_handshake_latencies(port, token, 30)
        async with wrong_token_flood(port) as statuses:
            await trio.sleep(2)
            during = await agent_handshake_latencies(port, token, 30)
        rows.append(
            (f"agent handshake, wrong-token flood {dict(sorted(statuses.items()))}", max(alone), max(during))
        )
    ok = True
    print(f"{'what (slowest of each series)':<70} {'alone':>9} {'flood':>9} {'delay':>9}")
    for what, before, flood in rows:
        delay = flood - before
        ok &= delay <= BOUND
        print(f"{what:<70} {before * 1000:>7.0f}ms {flood * 1000:>7.0f}ms {delay * 1000:>7.0f}ms")
    print("VERDICT:", "PASS" if ok else f"FAIL (a flood delayed another address by more than {BOUND:g} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
