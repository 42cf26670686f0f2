"""Tests of the subprocess helpers (procs.py) against fake_rtunnel.py, a stand-in that follows the CLI's
log contract: they prove the helpers work whether or not the real product runs yet."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import trio

from .procs import ProcessFailed, relay_ports, run_agent, run_relay

FAKE = (sys.executable, str(Path(__file__).with_name("fake_rtunnel.py")))


async def test_relay_and_agent_start_parse_and_stop_cleanly() -> None:
    async with run_relay("tok", command=FAKE) as relay:
        assert relay.http_port > 0 and relay.agents_port > 0
        assert relay.http_url == f"http://127.0.0.1:{relay.http_port}"
        assert relay.agents_url == f"ws://127.0.0.1:{relay.agents_port}"
        assert relay.args[-2:] == ["--token", "tok"]
        async with run_agent(relay.agents_url, "http://127.0.0.1:9", command=FAKE, allow=["GET /a"]) as ag:
            assert "connected to" in ag.log_text()
            assert ag.args[-4:] == ["--token", "test-token", "--allow", "GET /a"]
            await ag.wait_for_line("fake stdout line", stream="stdout")
        assert ag.returncode == 0
        assert "stopping" in ag.log_text()  # SIGTERM reached its handler
    assert relay.returncode == 0


async def test_wrong_exit_code_fails_the_test() -> None:
    with pytest.raises(ProcessFailed, match="exited with 7, expected 0"):
        async with run_relay(command=FAKE, env={"FAKE_RTUNNEL_EXIT": "7"}):
            pass
    async with run_relay(command=FAKE, env={"FAKE_RTUNNEL_EXIT": "7"}, expect_returncode=7):
        pass
    async with run_relay(command=FAKE, env={"FAKE_RTUNNEL_EXIT": "7"}, expect_returncode=None):
        pass


async def test_early_exit_fails_the_wait_at_once_with_the_log() -> None:
    with trio.fail_after(10), pytest.raises(ProcessFailed, match=r"(?s)exited \(code 3\).*fake|boom"):
        async with run_relay(command=FAKE, env={"FAKE_RTUNNEL_CRASH": "1"}, expect_returncode=3):
            pass
    async with run_agent(
        "ws://x",
        "http://y",
        command=FAKE,
        env={"FAKE_RTUNNEL_CRASH": "1"},
        wait_connected=False,
        expect_returncode=3,
    ) as agent:
        assert await agent.wait_exit() == 3
        assert "boom" in agent.log_text()


async def test_wait_for_line_timeout_and_since() -> None:
    async with run_relay(command=FAKE) as relay:
        with pytest.raises(ProcessFailed, match="no line matching 'never printed'"):
            await relay.wait_for_line("never printed", timeout=0.2)
        mark = relay.mark()
        assert relay.count_lines("listening") == 1
        assert relay.count_lines("listening", since=mark) == 0
        with pytest.raises(ProcessFailed):
            await relay.wait_for_line("listening", since=mark, timeout=0.2)


async def test_kill_skips_exit_code_and_restart_on_same_ports() -> None:
    with relay_ports() as ports:
        async with run_relay(command=FAKE, **ports) as relay:
            assert ports == {
                "http": f"127.0.0.1:{relay.http_port}",
                "agents": f"127.0.0.1:{relay.agents_port}",
            }
            relay.kill()
            assert await relay.wait_exit() == -signal.SIGKILL
            async with run_relay(command=FAKE, **ports) as again:
                assert (again.http_port, again.agents_port) == (relay.http_port, relay.agents_port)


async def test_sigterm_ignored_falls_back_to_sigkill() -> None:
    async with run_relay(command=FAKE, env={"FAKE_RTUNNEL_IGNORE_TERM": "1"}, expect_returncode=None) as r:
        with pytest.raises(ProcessFailed, match="ignored SIGTERM"):
            await r.terminate(timeout=0.3)
        assert r.returncode == -signal.SIGKILL


async def test_cancelled_test_still_stops_processes() -> None:
    seen = []
    with trio.CancelScope() as scope:
        async with run_relay(command=FAKE) as relay:
            seen.append(relay)
            scope.cancel()  # as a test's fail_after would
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert seen[0].returncode == 0  # stopped with SIGTERM under the shield, exit code checked
