"""What the relay lets in, checked in-process (no rtunnel processes): which token may serve which tunnel (a real
Relay on 127.0.0.1, agents dialing it with rtunnel.link.transport), and a request head still arriving when it
passes --max-head-size (relay_rig, memory streams, mock clock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from rtunnel.link import transport
from rtunnel.relay.exchange import HttpLimits
from rtunnel.relay.registry import Tunnel
from rtunnel.relay.server import TUNNEL_HEADER, Relay, RelayConfig

from ..relay_rig import relay_rig

RELAY_TOKEN = "relay-token"
SHOP_TOKEN = "shop-token"
TUNNELS = (
    Tunnel("shop", hosts=("shop.localhost",), token=SHOP_TOKEN.encode()),
    Tunnel("docs", path_prefix="/docs"),
)


async def _start(nursery: trio.Nursery, tunnels: tuple[Tunnel, ...] = TUNNELS) -> str:
    config = RelayConfig(
        http_port=0, agents_port=0, tokens=(RELAY_TOKEN.encode(),), tunnels=tunnels, auth_fail_limit=0
    )
    relay = Relay(config)
    await nursery.start(relay.run)
    assert relay.agents_address is not None
    host, port = relay.agents_address
    return f"ws://{host}:{port}/"


async def _dial(url: str, token: str | None, tunnel: str | None = None) -> str:
    """ "served" if the relay took the agent, else the refusal."""
    headers = () if tunnel is None else ((TUNNEL_HEADER, tunnel),)
    try:
        async with transport.connect(url, token=token, ssl_context=None, extra_headers=headers):
            return "served"
    except transport.ConnectError as exc:
        return str(exc)


@pytest.mark.parametrize(
    ("token", "tunnel", "outcome"),
    [
        (RELAY_TOKEN, "docs", "served"),
        (SHOP_TOKEN, "shop", "served"),
        (SHOP_TOKEN, None, "served"),  # a tunnel token names its tunnel
        # A tunnel's token serves that tunnel only, also where the other tunnel has no token of its own.
        (SHOP_TOKEN, "docs", "403 Forbidden: this token may not serve tunnel 'docs'"),
        (RELAY_TOKEN, "shop", "403 Forbidden: this token may not serve tunnel 'shop'"),
        ("wrong-token", "docs", "401 Unauthorized"),
        ("wrong-token", "shop", "401 Unauthorized"),
        (None, "docs", "401 Unauthorized"),
        (RELAY_TOKEN + "x", "docs", "401 Unauthorized"),
        (RELAY_TOKEN[:-1], "docs", "401 Unauthorized"),
        (RELAY_TOKEN, None, "403 Forbidden: this relay serves named tunnels"),
    ],
)
async def test_which_token_may_serve_which_tunnel(
    nursery: trio.Nursery, token: str | None, tunnel: str | None, outcome: str
) -> None:
    url = await _start(nursery)
    result = await _dial(url, token, tunnel)
    assert result == "served" if outcome == "served" else outcome in result


async def test_without_named_tunnels_only_the_relay_token_is_accepted(nursery: trio.Nursery) -> None:
    url = await _start(nursery, ())
    assert await _dial(url, RELAY_TOKEN) == "served"
    assert "401 Unauthorized" in await _dial(url, "wrong-token")
    assert "401 Unauthorized" in await _dial(url, None)


async def test_a_head_past_the_size_limit_is_431_before_it_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The head never ends (no blank line), so only the limit on a head still arriving can answer it, and must
    do so long before --head-timeout (a 408 would mean the relay buffered all of it and waited)."""
    async with relay_rig(HttpLimits(max_head_size=2048, head_timeout=300)) as rig:
        client = await rig.connect()
        await client.send(b"GET /x HTTP/1.1\r\nHost: a\r\n")
        start = trio.current_time()
        for i in range(40):  # 40 x 100 bytes, one line at a time; well under h11's own default limit
            await client.send(b"X-%02d: %s\r\n" % (i, b"v" * 94))
        status, _, body = await client.response(timeout=60)
        assert (status, body) == (431, b"request head too large\n")
        assert trio.current_time() - start < 300
        assert await client.closed()
    assert rig.agent.seen == []
