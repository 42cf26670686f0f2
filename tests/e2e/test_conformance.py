"""The conformance runner (python -m rtunnel.conformance) against our own relay and agent, as real processes,
and against peers that break the SPEC, which it must report as failures. Also the shutdown rules of SPEC 10.2,
which a runner that is the relay's agent cannot provoke: SIGTERM is sent to the relay here.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pytest
import trio
import trustme

from protocol import ErrorCode
from rtunnel.conformance.peers import GOAWAY, hostile_agent, hostile_relay
from rtunnel.link import transport

from .procs import RTUNNEL_CMD, ManagedProcess, run_process, run_relay

pytestmark = pytest.mark.e2e

RUNNER = (sys.executable, "-m", "rtunnel.conformance")
AGENT = [*RTUNNEL_CMD, "dial", "{url}", "--token", "{token}", "--upstream", "{upstream}"]
# Reconnect at once after the cases that end the connection.
FAST_RECONNECT = ["--backoff-initial", "0.05", "--backoff-cap", "0.2"]
_VERDICT = re.compile(r"^(PASS|FAIL|SKIP)  (MUST|SHOULD) +SPEC (\S+) +(.*)$")


async def _run(args: list[str], expect: int) -> list[tuple[str, str, str, str]]:
    """Run the runner to its end; its verdict lines as (verdict, level, section, title)."""
    async with run_process(
        ManagedProcess, "conformance", [*RUNNER, *args], expect_returncode=expect
    ) as runner:
        await runner.wait_exit(timeout=120)
    verdicts = [m.groups() for line in runner.stdout_text().splitlines() if (m := _VERDICT.match(line))]
    assert verdicts, runner.stdout_text()
    return verdicts  # type: ignore[return-value]


async def test_our_relay_passes(token: str) -> None:
    async with run_relay(token, extra_args=["--agent-wait", "5"]) as relay:
        verdicts = await _run(["relay", relay.agents_url, "--token", token, "--http", relay.http_url], 0)
    assert [v for v in verdicts if v[0] != "PASS"] == []
    titles = " | ".join(v[3] for v in verdicts)
    # The departures this runner was built to catch are among the cases.
    for needle in (
        "a text message: GOAWAY PROTOCOL_ERROR, then Close 1003",
        "Expect: 100-continue",
        "101 to a",
    ):
        assert needle in titles
    assert len(verdicts) >= 25


async def test_our_agent_passes() -> None:
    verdicts = await _run(["agent", "--", *AGENT, *FAST_RECONNECT], 0)
    assert [v for v in verdicts if v[0] != "PASS"] == []
    sections = {v[2] for v in verdicts}
    assert {"2", "2.1", "3.1", "4.1", "4.9", "5.2", "5.4", "5.4.1", "5.4.2"} <= sections
    assert len(verdicts) >= 20


async def test_a_relay_that_sends_no_hello_fails() -> None:
    # A WebSocket server that accepts rtunnel.v1 but never speaks it (nobody takes its connections): the PING
    # cases fail with a one-line reason, and the exit status says so.
    async with hostile_relay(timeout=1) as silent:
        args = ["relay", silent.url, "--token", "t", "--timeout", "0.5", "--only", "4.8"]
        async with run_process(
            ManagedProcess, "conformance", [*RUNNER, *args], expect_returncode=1
        ) as runner:
            await runner.wait_exit(timeout=120)
    out = runner.stdout_text()
    assert re.search(
        r"^FAIL  MUST    SPEC 4.8 +a PING is answered .*: no answer within", out, re.MULTILINE
    ), out
    assert re.search(r"^conformance: MUST 0/2 passed", out, re.MULTILINE), out


async def test_an_agent_that_never_connects_fails_fast() -> None:
    verdicts = await _run(["agent", "--", sys.executable, "-c", "pass"], 1)
    assert {v[0] for v in verdicts} == {"FAIL"}


async def test_a_command_that_cannot_start_is_exit_2() -> None:
    args = [*RUNNER, "agent", "--", "/nonexistent/agent"]
    async with run_process(ManagedProcess, "conformance", args, expect_returncode=2) as runner:
        await runner.wait_exit()
    assert "cannot start '/nonexistent/agent'" in runner.log_text()
    assert "Traceback" not in runner.log_text()


async def test_sigterm_sends_goaway_then_close_1001(token: str) -> None:
    # SPEC 10.2: an agent of a relay that shuts down hears GOAWAY first, then a Close handshake (before this,
    # it saw neither: the TCP connection just dropped, 1006).
    async with run_relay(token, extra_args=["--grace", "5"]) as relay:
        async with hostile_agent(relay.agents_url, token) as agent:
            await relay.wait_for_line("agent connected")
            relay.send_signal(signal.SIGTERM)
            goaway = await agent.wait_for(GOAWAY)
            assert goaway.error_code is ErrorCode.NO_ERROR
            close = await agent.wait_closed()
            assert close is not None and close[0] == transport.CLOSE_GOING_AWAY
        await relay.wait_exit()


async def test_a_draining_relay_turns_new_agents_away_with_1001(token: str) -> None:
    # A client exchange held open keeps the relay draining while a new agent tries to connect. --agent-wait 0:
    # once the first agent is gone, the exchange (resent, as a GET) ends in a 503 at once, not after 5 s.
    async with run_relay(token, extra_args=["--grace", "5", "--agent-wait", "0"]) as relay:
        async with hostile_agent(relay.agents_url, token) as first:
            await relay.wait_for_line("agent connected")
            host, port = relay.http_url.removeprefix("http://").rsplit(":", 1)
            held = await trio.open_tcp_stream(host, int(port))
            await held.send_all(b"GET /held HTTP/1.1\r\nHost: app\r\n\r\n")
            await first.wait_for(1)  # the OPEN: the exchange is busy, so the drain waits for it
            relay.send_signal(signal.SIGTERM)
            await first.wait_for(GOAWAY)
            await relay.wait_for_line("draining")
            async with hostile_agent(relay.agents_url, token, hello=False, timeout=5) as late:
                close = await late.wait_closed()
            assert close is not None and close[0] == transport.CLOSE_GOING_AWAY
            await held.aclose()
        await relay.wait_exit()


async def test_a_wss_relay_is_checked_with_its_ca(tmp_path: Path, token: str) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server = ca.issue_cert("127.0.0.1")
    server.private_key_pem.write_to_path(tmp_path / "key.pem")
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(tmp_path / "relay.pem", append=i > 0)
    tls = ["--tls-cert", str(tmp_path / "relay.pem"), "--tls-key", str(tmp_path / "key.pem")]
    async with run_relay(token, extra_args=tls) as relay:
        assert relay.agents_url.startswith("wss://")
        args = [
            "relay",
            relay.agents_url,
            "--token",
            token,
            "--only",
            "4.8",
            "--ca",
            str(tmp_path / "ca.pem"),
        ]
        verdicts = await _run(args, 0)
        # Without the CA the certificate is not trusted: every case fails, saying why.
        untrusted = await _run(["relay", relay.agents_url, "--token", token, "--only", "4.8", "-q"], 1)
    assert [v[0] for v in verdicts] == ["PASS", "PASS"]
    assert [v[0] for v in untrusted] == ["FAIL", "FAIL"]
