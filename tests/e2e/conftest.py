"""Fixtures for end-to-end tests: a real upstream, a real relay and agent (subprocesses), an HTTP client.

The upstream runs **in-process** (in the test's trio run), not as a subprocess: it is ready in milliseconds
instead of an interpreter start, tests read what it saw directly (``upstream.paths``, ``upstream.counts``)
and can steer it (``upstream.state.release(key)``), and the thing under test (relay and agent) still runs as
real separate processes, so nothing of the product shares our event loop. A test that must kill or restart
the upstream uses ``run_upstream_process()`` from procs.py instead.

Fixture teardown runs in reverse order: client, agent (SIGTERM, exit 0), relay (SIGTERM, exit 0), upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from .procs import Agent, Relay, http_client, new_token, run_agent, run_relay
from .upstream import Upstream, open_upstream


@pytest.fixture
def token() -> str:
    return new_token()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with open_upstream() as up:
        yield up


@pytest.fixture
async def relay(token: str) -> AsyncIterator[Relay]:
    async with run_relay(token) as proc:
        yield proc


@pytest.fixture
async def agent(relay: Relay, upstream: Upstream, token: str) -> AsyncIterator[Agent]:
    async with run_agent(relay.agents_url, upstream.url, token=token) as proc:
        yield proc


@pytest.fixture
async def client(relay: Relay, agent: Agent) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the relay's HTTP side, with the agent connected (the whole tunnel is up)."""
    async with http_client(relay.http_url) as c:
        yield c
