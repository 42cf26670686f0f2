"""Observability end to end, with real processes: the admin endpoint (/healthz, /readyz, /metrics,
/status.json), JSON logs with access fields, X-Request-Id propagation, and `rtunnel status`."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ..ports import refused_port
from .procs import (
    DEFAULT_TIMEOUT,
    REPO_ROOT,
    RTUNNEL_CMD,
    Agent,
    ManagedProcess,
    Relay,
    http_client,
    run_agent,
    run_relay,
)
from .upstream import Upstream

pytestmark = pytest.mark.e2e


ADMIN_RE = re.compile(r"admin listening on (http://\S+?:\d+)")
JSON_CMD = (*RTUNNEL_CMD, "--log-format", "json")
ADMIN_ARGS = ("--admin", "127.0.0.1:0")


async def admin_url(proc: ManagedProcess) -> str:
    match = await proc.wait_for_line(ADMIN_RE)
    return match.group(1)


async def wait_count(proc: ManagedProcess, pattern: str, n: int, *, since: int = 0) -> None:
    """Wait until at least `n` stderr lines from index `since` on contain `pattern`."""
    while True:
        hits = [i for i, line in enumerate(proc.stderr_lines[since:]) if pattern in line]
        if len(hits) >= n:
            return
        await proc.wait_for_line(pattern, since=since + (hits[-1] + 1 if hits else 0))


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by (name, sorted labels)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@asynccontextmanager
async def observed_tunnel(
    upstream: Upstream, token: str, *, command: tuple[str, ...] = RTUNNEL_CMD
) -> AsyncIterator[tuple[Relay, Agent, str, str]]:
    """A relay and an agent, each with an admin endpoint: (relay, agent, relay admin URL, agent admin URL)."""
    async with run_relay(token, extra_args=ADMIN_ARGS, command=command) as relay:
        relay_admin = await admin_url(relay)
        async with run_agent(
            relay.agents_url, upstream.url, token=token, extra_args=ADMIN_ARGS, command=command
        ) as agent:
            await relay.wait_for_line("agent connected from")
            yield relay, agent, relay_admin, await admin_url(agent)


async def rtunnel_status(admin: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*RTUNNEL_CMD, "status", "--admin", admin],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=REPO_ROOT,
    )


async def test_healthz_and_readyz_follow_the_agent(upstream: Upstream, token: str) -> None:
    async with run_relay(token, extra_args=(*ADMIN_ARGS, "--agent-wait", "0")) as relay:
        relay_admin = await admin_url(relay)
        async with http_client(relay_admin) as admin, http_client(relay.http_url) as client:
            assert (await admin.get("/healthz")).status_code == 200
            assert (await admin.get("/readyz")).status_code == 503
            # Without an agent the relay answers 503 itself, still with a request id.
            refused = await client.get("/nobody", headers={"X-Request-Id": "no-agent-1"})
            assert refused.status_code == 503
            assert refused.headers["x-request-id"] == "no-agent-1"

            mark = relay.mark()
            async with run_agent(relay.agents_url, upstream.url, token=token, extra_args=ADMIN_ARGS) as agent:
                await relay.wait_for_line("agent connected from", since=mark)
                assert (await admin.get("/readyz")).status_code == 200
                async with http_client(await admin_url(agent)) as agent_admin:
                    assert (await agent_admin.get("/healthz")).status_code == 200
                    assert (await agent_admin.get("/readyz")).status_code == 200
                mark = relay.mark()
            await relay.wait_for_line("disconnected", since=mark)
            assert (await admin.get("/readyz")).status_code == 503
            assert (await admin.get("/healthz")).status_code == 200
            assert (await admin.get("/nope")).status_code == 404


async def test_metrics_count_exchanges(upstream: Upstream, token: str) -> None:
    async with (
        observed_tunnel(upstream, token) as (relay, agent, relay_admin, agent_admin),
        http_client(relay.http_url) as client,
        http_client(relay_admin) as admin_r,
        http_client(agent_admin) as admin_a,
    ):
        before = metric_samples((await admin_r.get("/metrics")).text)
        ok = ("rtunnel_exchanges_total", (("status", "200"),))
        not_found = ("rtunnel_exchanges_total", (("status", "404"),))
        assert before.get(ok, 0) == 0
        assert before[("rtunnel_agents_connected", ())] == 1
        assert before[("rtunnel_connects_total", ())] == 1

        mark_r, mark_a = relay.mark(), agent.mark()
        for _ in range(3):
            assert (await client.post("/echo", content=b"x" * 1000)).status_code == 200
        assert (await client.get("/status/404")).status_code == 404
        # The counters are updated with the access line, just after the response went out.
        await wait_count(relay, "rtunnel.relay.access", 4, since=mark_r)
        await wait_count(agent, "rtunnel.agent.access", 4, since=mark_a)

        page = await admin_r.get("/metrics")
        assert page.headers["content-type"].startswith("text/plain")
        after = metric_samples(page.text)
        assert after[ok] == 3
        assert after[not_found] == 1
        assert after[("rtunnel_body_bytes_total", (("direction", "request"),))] == 3000
        assert after[("rtunnel_body_bytes_total", (("direction", "response"),))] > 0
        assert after[("rtunnel_request_duration_seconds_count", ())] == 4
        assert after[("rtunnel_streams_open", ())] == 0
        assert ("rtunnel_flow_control_stalls_total", ()) in after

        agent_side = metric_samples((await admin_a.get("/metrics")).text)
        assert agent_side[ok] == 3
        assert agent_side[not_found] == 1
        assert agent_side[("rtunnel_relays_connected", ())] == 1
        assert agent_side[("rtunnel_reconnects_total", ())] == 0


async def test_json_logs_carry_access_fields_and_request_ids(upstream: Upstream, token: str) -> None:
    async with (
        observed_tunnel(upstream, token, command=JSON_CMD) as (relay, agent, _, _),
        http_client(relay.http_url) as client,
    ):
        mark_r, mark_a = relay.mark(), agent.mark()
        response = await client.post("/echo?secret=1", content=b"y" * 1234)
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        await wait_count(relay, "rtunnel.relay.access", 1, since=mark_r)
        await wait_count(agent, "rtunnel.agent.access", 1, since=mark_a)

    for proc in (relay, agent):
        lines = [json.loads(line) for line in proc.stderr_lines if line.strip()]
        assert lines, proc.name
        for line in lines:
            assert {"time", "level", "logger", "message"} <= line.keys()
    relay_access = [
        json.loads(line) for line in relay.stderr_lines[mark_r:] if '"rtunnel.relay.access"' in line
    ]
    agent_access = [
        json.loads(line) for line in agent.stderr_lines[mark_a:] if '"rtunnel.agent.access"' in line
    ]
    assert len(relay_access) == len(agent_access) == 1
    for access in (relay_access[0], agent_access[0]):
        assert access["method"] == "POST"
        assert access["path"] == "/echo"  # never the query
        assert access["status"] == 200
        assert access["bytes_in"] == 1234
        assert access["bytes_out"] == len(response.content)
        assert isinstance(access["duration_ms"], int | float)
        assert access["request_id"] == request_id
        assert request_id in access["message"]


async def test_access_log_off_writes_no_access_line(upstream: Upstream, token: str) -> None:
    off = ("--access-log", "off")
    async with (
        run_relay(token, extra_args=off) as relay,
        run_agent(relay.agents_url, upstream.url, token=token, extra_args=off) as agent,
    ):
        await relay.wait_for_line("agent connected from")
        async with http_client(relay.http_url) as client:
            for _ in range(3):
                assert (await client.get("/echo")).status_code == 200
    # Both stopped (buffered lines are written at exit): other lines are there, access lines are not.
    for proc in (relay, agent):
        assert proc.count_lines("shutting down") == 1, proc.name
        assert proc.count_lines(".access") == 0, proc.name


async def test_request_id_generated_and_preserved_end_to_end(
    relay: Relay, agent: Agent, upstream: Upstream
) -> None:
    def seen_by_upstream(response: httpx.Response) -> list[str]:
        return [value for name, value in response.json()["headers"] if name.lower() == "x-request-id"]

    async with http_client(relay.http_url) as client:
        generated = await client.get("/echo")
        request_id = generated.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
        assert seen_by_upstream(generated) == [request_id]

        kept = await client.get("/echo", headers={"X-Request-Id": "trace-42:span/7"})
        assert kept.headers["x-request-id"] == "trace-42:span/7"
        assert seen_by_upstream(kept) == ["trace-42:span/7"]

        # Unsafe characters are dropped and the length is bounded; only one id is ever forwarded.
        hostile = await client.get(
            "/echo",
            headers=[("X-Request-Id", "a b<c>\"d'" + "e" * 300), ("X-Request-Id", "second")],
        )
        cleaned = hostile.headers["x-request-id"]
        assert cleaned.startswith("abcde") and len(cleaned) == 128
        assert seen_by_upstream(hostile) == [cleaned]

        unusable = await client.get("/echo", headers={"X-Request-Id": "<>"})
        assert re.fullmatch(r"[0-9a-f]{32}", unusable.headers["x-request-id"])

        bodiless = await client.get("/status/204", headers={"X-Request-Id": "mine"})
        assert bodiless.headers.get_list("x-request-id") == ["mine"]


async def test_status_command_lists_agents_and_exchanges_in_flight(upstream: Upstream, token: str) -> None:
    async with (
        observed_tunnel(upstream, token) as (relay, _agent, relay_admin, agent_admin),
        http_client(relay.http_url) as client,
        http_client(relay_admin) as admin,
        trio.open_nursery() as nursery,
    ):
        document = (await admin.get("/status.json")).json()
        assert document["role"] == "relay" and len(document["agents"]) == 1
        assert document["agents"][0]["peer"].startswith("127.0.0.1:")

        # Hold one exchange open so that the table shows it in flight.
        held = trio.Event()

        async def hold() -> None:
            async with client.stream("GET", "/hold/status") as response:
                async for _ in response.aiter_raw():
                    held.set()

        nursery.start_soon(hold)
        await held.wait()
        result = await rtunnel_status(relay_admin)
        output = result.stdout.decode()
        assert result.returncode == 0, result.stderr.decode()
        assert "1 agent connected" in output
        header, row = output.splitlines()[1:3]
        assert header.split() == ["AGENT", "TUNNEL", "UPTIME", "RTT", "IN", "FLIGHT"]
        assert row.startswith("127.0.0.1:") and row.split()[-1] == "1"
        upstream.state.release("status")

        result = await rtunnel_status(agent_admin.removeprefix("http://"))
        assert result.returncode == 0, result.stderr.decode()
        assert relay.agents_url in result.stdout.decode()


async def test_status_command_fails_clearly_when_unreachable() -> None:
    with refused_port() as port, trio.fail_after(DEFAULT_TIMEOUT):
        result = await rtunnel_status(f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout == b""
    message = result.stderr.decode()
    assert "cannot reach the admin endpoint" in message and str(port) in message
    assert len(message.strip().splitlines()) == 1
