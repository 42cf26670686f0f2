"""End to end: the `rtunnel` command line as a user meets it (bad configuration, signals, --version, demo)."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
import trio

import rtunnel

from .procs import RTUNNEL_CMD, ManagedProcess, http_client, run_agent, run_process, run_relay
from .upstream import Upstream, payload

pytestmark = pytest.mark.e2e

UP = "http://127.0.0.1:9"
WS = "ws://127.0.0.1:9"


def bad_configs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, a word the one-line message must contain)."""
    return {
        "unparsable --http": (["serve", "--http", "nonsense"], "--http"),
        "--agent-wait not a number": (["serve", "--agent-wait", "soon"], "--agent-wait"),
        "--trusted-proxy not a network": (["serve", "--trusted-proxy", "10.0.0/8"], "--trusted-proxy"),
        "missing --upstream": (["dial", WS], "--upstream"),
        "unreadable --token-file": (
            ["dial", WS, "--upstream", UP, "--token-file", str(tmp_path / "no")],
            "token",
        ),
        "--allow without a path": (["dial", WS, "--upstream", UP, "--allow", "GET"], "--allow"),
        "relay URL with http://": (["dial", "http://127.0.0.1:9", "--upstream", UP], "relay URL"),
        "https upstream": (["dial", WS, "--upstream", "https://127.0.0.1:9"], "upstream"),
    }


async def test_bad_configuration_exits_2_with_one_line(tmp_path: Path) -> None:
    cases = bad_configs(tmp_path)
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def run(name: str, args: list[str]) -> None:
        with trio.fail_after(30):
            results[name] = await trio.run_process(
                [*RTUNNEL_CMD, *args], capture_stdout=True, capture_stderr=True, check=False
            )

    async with trio.open_nursery() as nursery:
        for name, (args, _) in cases.items():
            nursery.start_soon(run, name, args)

    problems = []
    for name, (_, word) in cases.items():
        result = results[name]
        err = result.stderr.decode("utf-8", "replace")
        lines = err.strip().splitlines()
        if result.returncode != 2 or len(lines) != 1 or "Traceback" in err or word not in err:
            problems.append(f"{name}: exit {result.returncode}, stderr:\n{err}")
        elif "error" not in lines[0]:
            problems.append(f"{name}: the line does not say it is an error: {lines[0]}")
    assert not problems, "\n".join(problems)


async def test_version() -> None:
    result = await trio.run_process(
        [*RTUNNEL_CMD, "--version"], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"rtunnel {rtunnel.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", rtunnel.__version__)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_stops_serve_and_dial_cleanly(
    sig: signal.Signals, upstream: Upstream, token: str
) -> None:
    async with run_relay(token) as relay:
        async with run_agent(relay.agents_url, upstream.url, token=token) as agent:
            async with http_client(relay.http_url) as c:
                r = await c.get("/bytes/1000")
                assert (r.status_code, r.content) == (200, payload(1000))
            agent.send_signal(sig)
            assert await agent.wait_exit() == 0
        relay.send_signal(sig)
        assert await relay.wait_exit() == 0
    for proc in (agent, relay):
        text = proc.log_text()
        assert "Traceback" not in text, text
        assert f"received {sig.name}" in text, text


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_demo(sig: signal.Signals) -> None:
    async with run_process(ManagedProcess, "demo", [*RTUNNEL_CMD, "demo"]) as demo:
        await demo.wait_for_line("Try it", stream="stdout")
        out = demo.stdout_text()
        # The three sample requests, as the demo reports them: GET and POST are allowed, DELETE is the
        # allowlist's refusal the demo shows on purpose.
        results = re.findall(r"^(GET|POST|DELETE)\s+(\S+)\s+-> (\d{3})", out, re.MULTILINE)
        assert results == [("GET", "/hello", "200"), ("POST", "/echo", "200"), ("DELETE", "/hello", "403")], (
            out
        )
        assert "hello from the service behind the tunnel" in out
        url = re.search(r"curl -i (http://\S+)", out)
        assert url is not None, out
        # The printed URL works, through the tunnel.
        async with http_client() as c:
            r = await c.get(url.group(1))
            assert r.status_code == 200
            assert r.json()["service"] == "hello from the service behind the tunnel"
        demo.send_signal(sig)
        assert await demo.wait_exit() == 0
    assert "Traceback" not in demo.log_text(), demo.log_text()
