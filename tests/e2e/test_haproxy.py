"""Two relays behind HAProxy (TCP mode), one agent dialing both: losing a relay loses no request.

This is the deployment README describes: relays share no state, so clients reach them through an ordinary TCP
load balancer, and every agent keeps one connection to each relay (`rtunnel dial URL1 URL2`).

HAProxy comes from the distribution's packages (.ci/run installs it). Outside CI (env CI unset) the test is
skipped when the binary is absent; in CI it must run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from pathlib import Path

import httpx
import pytest
import trio

from .procs import RTUNNEL_CMD, Agent, ManagedProcess, http_client, run_process, run_relay, wait_counts
from .test_resilience import AGENT_ARGS, RELAY_ARGS, note
from .upstream import Upstream

pytestmark = pytest.mark.e2e

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
)
if HAPROXY is None and not os.environ.get("CI"):
    pytest.skip(
        "haproxy is not installed (apt-get install haproxy; .ci/run does it)", allow_module_level=True
    )


@pytest.fixture
def token() -> str:
    return "t" + secrets.token_urlsafe(16)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_config(front: int, backends: list[int]) -> str:
    # TCP mode: HAProxy knows nothing of HTTP, as with any L4 balancer. A dead relay refuses connections:
    # `retries` + `redispatch` send such a connection to the other relay, and the health checks take the
    # dead one out of the rotation shortly after.
    servers = "\n".join(
        f"    server relay{i} 127.0.0.1:{port} check inter 200ms fall 1 rise 1"
        for i, port in enumerate(backends, 1)
    )
    return f"""\
global
    maxconn 512

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch 1

frontend tunnel_http
    bind 127.0.0.1:{front}
    default_backend relays

backend relays
    balance roundrobin
{servers}
"""


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
        front = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(haproxy_config(front, [first.http_port, second.http_port]))
        async with run_process(
            ManagedProcess, "haproxy", [HAPROXY, "-db", "-f", str(config)], expect_returncode=None
        ):
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
