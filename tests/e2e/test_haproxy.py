"""Two relays behind HAProxy (TCP mode), one agent dialing both: losing a relay loses no request.

This is the deployment docs/operations.md describes: relays share no state, so clients reach them through an
ordinary TCP load balancer, and every agent keeps one connection to each relay (`rtunnel dial URL1 URL2`).

HAProxy comes from the distribution's packages (.ci/run installs it). Outside CI (env CI unset) the test is
skipped when the binary is absent; in CI it must run.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from ..ports import bound_socket
from .procs import (
    RTUNNEL_CMD,
    Agent,
    ManagedProcess,
    http_client,
    run_agent,
    run_process,
    run_relay,
    wait_counts,
)
from .test_resilience import AGENT_ARGS, RELAY_ARGS, note
from .test_security_limits import raw_from
from .upstream import Upstream

pytestmark = pytest.mark.e2e

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
)
if HAPROXY is None and not os.environ.get("CI"):
    pytest.skip(
        "haproxy is not installed (apt-get install haproxy; .ci/run does it)", allow_module_level=True
    )


# HAProxy in TCP mode, as any L4 balancer: it knows nothing of HTTP. `front` is the number of an inherited file
# descriptor: the test binds the port and HAProxy listens on it.
TCP_CONFIG = """\
global
    maxconn 512

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
{defaults}
frontend tunnel_http
    bind fd@{front}
    default_backend relays

backend relays
{backend}
"""


def haproxy_config(front: int, backends: list[int]) -> str:
    # A dead relay refuses connections: `retries` + `redispatch` send such a connection to the other relay,
    # and the health checks take the dead one out of the rotation shortly after.
    servers = "\n".join(
        f"    server relay{i} 127.0.0.1:{port} check inter 200ms fall 1 rise 1"
        for i, port in enumerate(backends, 1)
    )
    defaults = "    retries 3\n    option redispatch 1\n"
    return TCP_CONFIG.format(front=front, defaults=defaults, backend=f"    balance roundrobin\n{servers}")


@asynccontextmanager
async def run_haproxy(config: Path, make_config: Callable[[int], str]) -> AsyncIterator[int]:
    """HAProxy with `make_config(fd)` listening on a socket the test bound (never a port probed free, which
    another process may take before HAProxy binds it); yields that socket's port."""
    assert HAPROXY is not None
    with bound_socket() as sock:
        await trio.Path(config).write_text(make_config(sock.fileno()))
        async with run_process(
            ManagedProcess,
            "haproxy",
            [HAPROXY, "-db", "-f", str(config)],
            expect_returncode=None,
            pass_fds=[sock.fileno()],
        ):
            yield int(sock.getsockname()[1])


async def wait_accepting(port: int) -> None:
    with trio.fail_after(15):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def test_two_relays_behind_haproxy_survive_the_loss_of_one(
    upstream: Upstream, token: str, tmp_path: Path
) -> None:
    assert HAPROXY is not None, "haproxy must be installed in CI (.ci/run installs it)"
    async with (
        run_relay(token, extra_args=RELAY_ARGS) as first,
        run_relay(token, extra_args=RELAY_ARGS) as second,
        # One agent, one connection to each relay.
        run_process(
            Agent,
            "agent",
            [
                *RTUNNEL_CMD,
                "dial",
                first.agents_url,
                second.agents_url,
                "--upstream",
                upstream.url,
                "--token",
                token,
                *AGENT_ARGS,
            ],
        ) as agent,
    ):
        await agent.wait_for_line(f"connected to {second.agents_url}")
        await agent.wait_for_line(f"connected to {first.agents_url}")
        config = tmp_path / "haproxy.cfg"
        async with run_haproxy(
            config, lambda fd: haproxy_config(fd, [first.http_port, second.http_port])
        ) as front:
            await wait_accepting(front)
            base = f"http://127.0.0.1:{front}"
            # No keep-alive: each request is a new TCP connection, balanced on its own.
            async with http_client(base, limits=httpx.Limits(max_keepalive_connections=0)) as client:
                for i in range(40):
                    response = await client.get(f"/before/{i}")
                    assert response.status_code == 200, response.text
                served = await wait_counts([first, second], "rtunnel.relay.access", 40)
                note(f"40 requests through HAProxy, per relay: {served}")
                assert min(served) > 0  # both relays take traffic

                first.kill()
                await first.wait_exit()
                for i in range(60):
                    response = await client.post(f"/count/after-{i}", content=b"x" * 100)
                    assert response.status_code == 200, response.text
                    assert response.json() == {"key": f"after-{i}", "count": 1}
                    response = await client.get(f"/after/{i}")
                    assert response.status_code == 200, response.text
            # The agent noticed the loss and keeps trying that relay, while serving through the other.
            await agent.wait_for_line(f"relay {first.agents_url}: connection lost")
            assert "connected to" in agent.log_text()


def haproxy_proxy_protocol_config(front: int, relay_port: int, send: str) -> str:
    # The PROXY header is HAProxy's way to tell an L4 backend who the client is (`send-proxy` v1 text,
    # `send-proxy-v2` binary), the same as the configuration in docs/operations.md ("The client's address
    # behind the balancer").
    server = f"    server relay1 127.0.0.1:{relay_port} {send} check inter 100ms"
    return TCP_CONFIG.format(front=front, defaults="", backend=server)


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
async def test_behind_haproxy_with_the_proxy_protocol_each_client_is_itself(
    upstream: Upstream, token: str, tmp_path: Path, send: str
) -> None:
    assert HAPROXY is not None, "haproxy must be installed in CI (.ci/run installs it)"
    limits = ["--proxy-protocol", "--max-exchanges-per-ip", "2", "--head-timeout", "2"]
    async with (
        run_relay(token, extra_args=[*RELAY_ARGS, *limits]) as relay,
        run_agent(relay.agents_url, upstream.url, token=token),
    ):
        config = tmp_path / "haproxy.cfg"
        async with run_haproxy(
            config, lambda fd: haproxy_proxy_protocol_config(fd, relay.http_port, send)
        ) as front:
            await wait_accepting(front)
            # Each connection is opened just before its request: opened earlier, it could meet the 2 s
            # --head-timeout while the others' exchanges cross a loaded machine.
            async with AsyncExitStack() as stack:
                # Two exchanges in progress from 127.0.0.2 through the balancer ...
                for key in (b"a", b"b"):
                    conn = await stack.enter_async_context(raw_from("127.0.0.2", front))
                    await conn.send(b"GET /hold/" + key + b" HTTP/1.1\r\nHost: a\r\n\r\n")
                    await conn.read_until(b"held\n")
                # ... so its third is over its limit, while 127.0.0.1, through the same balancer, is not.
                third = await stack.enter_async_context(raw_from("127.0.0.2", front))
                await third.send(b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n")
                assert (await third.response()).status == 429
                other = await stack.enter_async_context(raw_from("127.0.0.1", front))
                await other.send(b"GET /echo/other HTTP/1.1\r\nHost: a\r\n\r\n")
                echoed = await other.response()
                assert echoed.status == 200
                for key in ("a", "b"):
                    upstream.state.release(key)
                # Whoever sent a request, the upstream sees its real address, not the balancer's.
                forwarded = {k.lower(): v for k, v in echoed.json()["headers"]}["x-forwarded-for"]
                assert forwarded == "127.0.0.1"
            await relay.wait_for_line(re.compile(r"access.*127\.0\.0\.2 GET /third 429"))
            await relay.wait_for_line(re.compile(r"access.*127\.0\.0\.1 GET /echo/other 200"))
            # Straight to the relay, without the balancer's header: closed, and logged.
            async with raw_from("127.0.0.2", relay.http_port) as direct:
                await direct.send(b"GET /direct HTTP/1.1\r\nHost: a\r\n\r\n")
                assert await direct.closed()
            await relay.wait_for_line("closing a connection from 127.0.0.2: not a PROXY protocol header")
            # HAProxy's health checks (every 100 ms) carry the header too: none of them was refused.
            assert relay.count_lines("closing a connection from 127.0.0.1") == 0
    assert "/direct" not in upstream.paths and "/third" not in upstream.paths
