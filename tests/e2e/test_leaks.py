"""Nothing leaks: after a burst of every kind of exchange (aborted ones included) and a cut of the agents'
links, the relay and both agents report zero open streams and the trio tasks and file descriptors they had
before the traffic. bench/soak.py runs the same traffic for minutes; this is its short version.
"""

from __future__ import annotations

import pytest
import trio

from .traffic import Checker, Snapshot, Stack, burst, open_stack

pytestmark = pytest.mark.e2e

SETTLE = 30  # seconds for every end to notice what the burst left behind (closed clients, cut links)


def _levels(snapshot: Snapshot) -> dict[str, tuple[int, int, int]]:
    """Per process: open streams, trio tasks, and file descriptors other than pooled upstream connections
    (an agent keeps idle keep-alive connections to its upstream on purpose, up to its pool's bound)."""
    return {
        name: (p["streams_open"], p["tasks"], p["fds"] - p["pooled_connections"])
        for name, p in snapshot.processes.items()
    }


async def _settled(
    stack: Stack, expected: dict[str, tuple[int, int, int]]
) -> dict[str, tuple[int, int, int]]:
    """The levels once they equal `expected`, or the last ones seen after SETTLE seconds."""
    levels = _levels(await stack.snapshot())
    with trio.move_on_after(SETTLE):
        while levels != expected:
            await trio.sleep(0.2)
            levels = _levels(await stack.snapshot())
    return levels


async def test_a_burst_of_every_kind_and_a_link_cut_leave_nothing_behind(token: str) -> None:
    async with open_stack(token) as stack:
        checker = Checker()
        await burst(stack, checker, small=2)  # warm-up: lazily made things (pools, caches) exist from here
        await stack.http.aclose()
        start = _levels(await stack.snapshot())
        assert all(streams == 0 for streams, _, _ in start.values()), start
        stack.http = type(stack.http)(base_url=stack.http.base_url, timeout=30, trust_env=False)
        async with stack.http:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(burst, stack, checker)
                nursery.start_soon(burst, stack, checker)
            stack.proxy.cut()  # both agents' links reset: their exchanges' state must go with them
            checker.cuts.append(trio.current_time())
            await stack.wait_links(2)
            await burst(stack, checker)
        assert not checker.wrong, checker.wrong
        assert not checker.unexcused_failures(), checker.failed
        assert set(checker.ok) == {
            "small", "bulk down", "bulk up", "sse", "websocket", "aborted upload", "aborted download", "denied"
        }  # fmt: skip
        assert await _settled(stack, start) == start
