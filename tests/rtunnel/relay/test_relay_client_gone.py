"""A client that leaves while its exchange waits for the agent: the relay resets the stream (so the agent and
its upstream stop working for nobody) and frees the exchange's slot, whether it left before or after the relay
started watching a bodiless exchange's client (relay.exchange.WATCH_AFTER)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from rtunnel.relay.exchange import WATCH_AFTER, HttpLimits
from tests.trio_helpers import wait_until

from ..relay_rig import relay_rig


@pytest.mark.parametrize("leave_after", [0.0, WATCH_AFTER / 2, WATCH_AFTER * 4])
@pytest.mark.parametrize(
    "head",
    [
        b"GET /hold/a HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /hold/a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
    ],
)
async def test_a_client_that_leaves_a_held_exchange_gets_its_stream_reset(
    autojump_clock: trio.testing.MockClock, leave_after: float, head: bytes
) -> None:
    async with relay_rig(HttpLimits(max_exchanges_per_ip=1)) as rig:
        client = await rig.connect("198.51.100.7")
        await client.send(head)
        await wait_until(lambda: rig.agent.seen, interval=0.001)  # the exchange reached the agent
        await trio.sleep(leave_after)
        await client.stream.aclose()
        with trio.fail_after(10):
            await wait_until(lambda: rig.agent.seen[0].reset)
            await client.done.wait()
        # The slot of the abandoned exchange is free again: the same address gets the next one.
        other = await rig.connect("198.51.100.7")
        await other.send(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await other.response())[0] == 200


async def test_a_slow_bodiless_exchange_then_a_pipelined_one_on_the_same_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The late watcher reads the pipelined request while the first waits; the connection then serves it."""
    async with relay_rig() as rig:
        client = await rig.connect()
        await client.send(b"GET /hold/a HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        await trio.sleep(WATCH_AFTER * 4)
        rig.agent.release("a")
        status, _, body = await client.response()
        assert (status, body) == (200, b"GET /hold/a 0")
        status, _, body = await client.response()
        assert (status, body) == (200, b"GET /second 0")
        assert rig.agent.targets == [b"/hold/a", b"/second"]
