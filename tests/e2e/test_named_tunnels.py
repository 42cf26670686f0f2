"""End to end: one relay, several named tunnels, each with its own agents, routed by Host or path prefix.

Two in-process upstreams stand for two services; each agent serves one tunnel. What each upstream saw
(``upstream.paths``) shows where a request went.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from .procs import REPO_ROOT, Relay, http_client, run_agent, run_relay
from .rawhttp import open_raw, request_bytes
from .upstream import Upstream, open_upstream

pytestmark = pytest.mark.e2e

BUDGET = 60
SHOP_TOKEN = "tok-shop-0123456789"
API_TOKEN = "tok-api-9876543210"
TUNNEL_TOKENS = {"RTUNNEL_TUNNEL_SHOP_TOKEN": SHOP_TOKEN, "RTUNNEL_TUNNEL_API_TOKEN": API_TOKEN}
TUNNELS = [
    "--tunnel",
    "shop=host:shop.example,host:www.shop.example",
    "--tunnel",
    "api=prefix:/api",
    "--tunnel",
    "docs=prefix:/docs,keep-prefix",
]


@dataclass
class Setup:
    relay: Relay
    shop: Upstream
    api: Upstream
    admin: str  # http://host:port of the relay's admin endpoint


@asynccontextmanager
async def two_tunnels(token: str) -> AsyncIterator[Setup]:
    """A relay with tunnels shop (by host), api (by prefix, with their own tokens) and docs (no agent)."""
    async with (
        open_upstream() as shop,
        open_upstream() as api,
        run_relay(
            token, extra_args=[*TUNNELS, "--agent-wait", "0", "--admin", "0"], env=TUNNEL_TOKENS
        ) as relay,
        run_agent(relay.agents_url, shop.url, token=SHOP_TOKEN, extra_args=["--tunnel", "shop"]),
        run_agent(relay.agents_url, api.url, token=API_TOKEN, extra_args=["--tunnel", "api"]),
    ):
        match = await relay.wait_for_line(re.compile(r"admin listening on (http://\S+) "))
        await relay.wait_for_line("for tunnel 'api'")
        await relay.wait_for_line("for tunnel 'shop'")
        yield Setup(relay, shop, api, match.group(1))


async def get(port: int, target: str, host: str) -> tuple[int, str, dict[str, str]]:
    async with open_raw(port) as raw:
        await raw.send(request_bytes("GET", target, [("Host", host)]))
        response = await raw.response()
    headers = {k.decode().lower(): v.decode() for k, v in response.headers}
    return response.status, response.text, headers


async def test_routing_by_host_and_by_prefix(token: str) -> None:
    with trio.fail_after(BUDGET):
        async with two_tunnels(token) as s:
            port = s.relay.http_port
            # By Host: case, a port and a trailing dot do not matter; the target is forwarded unchanged.
            for host in ("shop.example", "SHOP.Example:8080", "www.shop.example."):
                status, body, _ = await get(port, "/echo/cart?x=1", host)
                assert status == 200, body
                assert json.loads(body)["target"] == "/echo/cart?x=1"
            # By prefix (any host): the prefix is stripped and announced in X-Forwarded-Prefix.
            status, body, _ = await get(port, "/api/echo/items?page=2", "anything.example")
            assert status == 200, body
            seen = json.loads(body)
            assert seen["target"] == "/echo/items?page=2"
            assert ["X-Forwarded-Prefix", "/api"] in seen["headers"]
            status, body, _ = await get(port, "/api", "anything.example")
            assert (status, body) == (200, "/")
            # The prefix matches whole segments, on the normalized path.
            status, body, _ = await get(port, "/%61pi/x", "anything.example")
            assert (status, body) == (200, "/x")
            status, body, _ = await get(port, "/apix", "anything.example")
            assert status == 404
            # Unknown host: 404 with a body that says what was not found; no agent saw it.
            status, body, headers = await get(port, "/echo", "unknown.example")
            assert status == 404
            assert headers["content-type"].startswith("text/plain")
            assert "no tunnel on this relay serves host 'unknown.example'" in body
            # A configured tunnel without any agent: 503, like a relay without agents.
            status, body, headers = await get(port, "/docs/intro", "x.example")
            assert status == 503
            assert "tunnel 'docs'" in body
            assert "retry-after" in headers
            assert s.shop.paths == ["/echo/cart?x=1"] * 3
            assert s.api.paths == ["/echo/items?page=2", "/", "/x"]

            async with http_client(s.admin) as admin:
                ready = {
                    name: (await admin.get(f"/readyz?tunnel={name}")).status_code
                    for name in ("shop", "api", "docs")
                }
                assert ready == {"shop": 200, "api": 200, "docs": 503}
                assert (await admin.get("/readyz")).status_code == 200
                metrics = (await admin.get("/metrics")).text
                assert 'rtunnel_tunnel_links{tunnel="shop"} 1.0' in metrics
                assert 'rtunnel_tunnel_links{tunnel="api"} 1.0' in metrics
                status_doc = (await admin.get("/status.json")).json()
                assert sorted(agent["tunnel"] for agent in status_doc["agents"]) == ["api", "shop"]


async def test_a_tunnel_token_serves_its_tunnel_only(token: str) -> None:
    with trio.fail_after(BUDGET):
        async with two_tunnels(token) as s:
            refusals = [
                # (token, --tunnel, the status the relay refuses the upgrade with, its reason)
                (SHOP_TOKEN, "api", 403, "this token may not serve tunnel 'api'"),
                (token, "shop", 403, "this token may not serve tunnel 'shop'"),  # the relay's token neither
                ("tok-wrong-000000000", "shop", 401, "missing or wrong token"),
                (API_TOKEN, "nosuch", 404, "no tunnel named 'nosuch'"),
                (token, None, 403, "name one (rtunnel dial --tunnel NAME)"),
            ]
            for agent_token, tunnel, status, reason in refusals:
                extra = [] if tunnel is None else ["--tunnel", tunnel]
                async with run_agent(
                    s.relay.agents_url, s.api.url, token=agent_token, extra_args=extra, wait_connected=False
                ) as intruder:
                    line = (await intruder.wait_for_line("refused")).string
                    assert f"({status} " in line, line
                    assert reason in line, line
            # A tunnel token without --tunnel serves the tunnel it belongs to.
            mark = s.relay.mark()
            async with run_agent(s.relay.agents_url, s.shop.url, token=SHOP_TOKEN):
                await s.relay.wait_for_line("for tunnel 'shop' (2 connected)", since=mark)
            # Nothing a refused agent could have served reached an upstream.
            assert s.shop.paths == [] and s.api.paths == []


async def test_config_file_tunnel_tables(token: str, tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        '[[tunnel]]\nname = "wiki"\nhosts = ["wiki.example"]\n\n'
        '[[tunnel]]\nname = "files"\npath_prefix = "/files/"\nstrip_prefix = false\n'
    )
    with trio.fail_after(BUDGET):
        async with (
            open_upstream() as wiki,
            open_upstream() as files,
            run_relay(token, extra_args=["--config", str(config)]) as relay,
            run_agent(relay.agents_url, wiki.url, token=token, extra_args=["--tunnel", "wiki"]),
            run_agent(relay.agents_url, files.url, token=token, extra_args=["--tunnel", "files"]),
        ):
            # Tunnels without a token of their own are served with the relay's token.
            assert (await get(relay.http_port, "/page/1", "wiki.example"))[:2] == (200, "/page/1")
            assert (await get(relay.http_port, "/files/a.txt", "other.example"))[:2] == (200, "/files/a.txt")
            assert (await get(relay.http_port, "/page/1", "other.example"))[0] == 404
    assert wiki.paths == ["/page/1"]
    assert files.paths == ["/files/a.txt"]  # strip_prefix = false: forwarded as the client sent it


async def test_without_tunnels_everything_is_one_default_tunnel(token: str, upstream: Upstream) -> None:
    with trio.fail_after(BUDGET):
        async with run_relay(token) as relay:
            async with run_agent(
                relay.agents_url,
                upstream.url,
                token=token,
                extra_args=["--tunnel", "x"],
                wait_connected=False,
            ) as named:
                line = (await named.wait_for_line("refused")).string
                assert "404" in line and "this relay has no named tunnels" in line
            async with run_agent(relay.agents_url, upstream.url, token=token):
                status, body, _ = await get(relay.http_port, "/any/path", "any.example")
    assert (status, body) == (200, "/any/path")


def test_tunnel_option_errors_exit_2() -> None:
    cases = [
        (["--tunnel", "bad name=host:x"], "NAME is letters"),
        (["--tunnel", "a=port:1"], "bad rule 'port:1'"),
        (["--tunnel", "a=host:x", "--tunnel", "b=host:X"], "routed to two tunnels"),
        (["--tunnel", "a=prefix:/p", "--tunnel", "b=prefix:/p/"], "same path prefix"),
    ]
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "rtunnel", "serve", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
        )
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr  # one line
