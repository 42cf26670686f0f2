"""The dashboard and the inspector on the admin endpoint, with real processes: the event stream, capture
and redaction end to end, the memory bound, replay, the admin token, CSRF, and the start-up refusal."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .procs import (
    REPO_ROOT,
    RTUNNEL_CMD,
    Agent,
    ManagedProcess,
    Relay,
    http_client,
    new_token,
    run_agent,
    run_relay,
)
from .upstream import Upstream

pytestmark = pytest.mark.e2e

ADMIN_RE = re.compile(r"admin listening on (http://\S+?:\d+)")
ADMIN_TOKEN = "adm-" + "x" * 20


async def admin_url(proc: ManagedProcess) -> str:
    return (await proc.wait_for_line(ADMIN_RE)).group(1)


@asynccontextmanager
async def inspected_tunnel(
    upstream: Upstream,
    token: str,
    relay_args: Sequence[str] = ("--inspect", "20"),
    agent_args: Sequence[str] = ("--inspect", "20"),
    allow: Sequence[str] = (),
) -> AsyncIterator[tuple[Relay, Agent, str, str]]:
    async with run_relay(token, extra_args=("--admin", "127.0.0.1:0", *relay_args)) as relay:
        relay_admin = await admin_url(relay)
        async with run_agent(
            relay.agents_url,
            upstream.url,
            token=token,
            allow=allow,
            extra_args=("--admin", "127.0.0.1:0", *agent_args),
        ) as agent:
            await relay.wait_for_line("agent connected from")
            yield relay, agent, relay_admin, await admin_url(agent)


class Events:
    """A reader of the admin endpoint's server-sent events."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def next(self) -> tuple[str, dict[str, Any]]:
        name, data = "message", ""
        async for line in self._lines:
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data += line.removeprefix("data: ")
            elif not line and data:
                return name, json.loads(data)
        raise AssertionError("the event stream ended")

    async def until(self, predicate: Any) -> dict[str, Any]:
        with trio.fail_after(10):
            while True:
                _, data = await self.next()
                if predicate(data):
                    return data


@asynccontextmanager
async def events(admin: httpx.AsyncClient) -> AsyncIterator[tuple[Events, dict[str, Any]]]:
    async with admin.stream("GET", "/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        reader = Events(response)
        name, snapshot = await reader.next()
        assert name == "snapshot"
        yield reader, snapshot


async def wait_captured(admin: httpx.AsyncClient, capture_id: int) -> None:
    """Until the inspector has finished capture `capture_id` (it is recorded once the response is out)."""
    async with events(admin) as (stream, snapshot):
        if any(row["id"] >= capture_id for row in snapshot["inspector"]["rows"]):
            return
        await stream.until(lambda d: any(row["id"] >= capture_id for row in d["rows"]))


async def session(admin: httpx.AsyncClient) -> str:
    """Open the page (which sets the session cookie), then read the session's CSRF token from the stream."""
    assert (await admin.get("/")).status_code == 200
    async with events(admin) as (_, snapshot):
        csrf = snapshot["csrf"]
    assert csrf
    return str(csrf)


async def test_event_stream_shows_the_agent_then_each_exchange(upstream: Upstream, token: str) -> None:
    async with (
        inspected_tunnel(upstream, token) as (relay, _agent, relay_admin, _),
        http_client(relay_admin) as admin,
        http_client(relay.http_url) as client,
        events(admin) as (stream, snapshot),
    ):
        assert snapshot["role"] == "relay"
        assert len(snapshot["status"]["agents"]) == 1
        assert snapshot["inspector"]["enabled"] and snapshot["inspector"]["rows"] == []
        assert len(snapshot["series"]["points"]) == 120  # 10 minutes of 5-second buckets
        assert (await client.get("/hello", headers={"X-Request-Id": "rid-1"})).status_code == 200
        update = await stream.until(lambda d: d["rows"])
        (row,) = update["rows"]
        assert (row["method"], row["path"], row["status"], row["request_id"]) == (
            "GET",
            "/hello",
            200,
            "rid-1",
        )
        assert row["peer"].startswith("agent 127.0.0.1:")
        assert sum(point[1] for point in update["series"]["points"]) == 1
        # A 502 from the agent (nothing listens upstream) lands in the last errors, with its reason.
        assert (await client.get("/status/503")).status_code == 503
        update = await stream.until(lambda d: d["errors"])
        assert update["errors"][0]["status"] == 503


async def test_relay_errors_carry_their_reason_and_request_id(token: str) -> None:
    async with (
        run_relay(token, extra_args=("--admin", "127.0.0.1:0", "--agent-wait", "0")) as relay,
        http_client(await admin_url(relay)) as admin,
        http_client(relay.http_url) as client,
        events(admin) as (stream, snapshot),
    ):
        assert snapshot["inspector"]["enabled"] is False
        response = await client.get("/x", headers={"X-Request-Id": "no-agent-1"})
        assert response.status_code == 503
        update = await stream.until(lambda d: d["errors"])
        (error,) = update["errors"]
        assert error["request_id"] == "no-agent-1"
        assert "no agent available" in error["reason"]


async def test_capture_redacts_secrets_before_anyone_sees_them(upstream: Upstream, token: str) -> None:
    async with (
        inspected_tunnel(upstream, token) as (relay, _, relay_admin, agent_admin),
        http_client(relay_admin) as admin,
        http_client(agent_admin) as agent_side,
        http_client(relay.http_url) as client,
    ):
        body = json.dumps({"user": "u", "password": "pw-SECRET", "nested": {"api_key": "k-SECRET"}})
        response = await client.post(
            "/echo?access_token=q-SECRET&page=2",
            content=body,
            headers={
                "Authorization": "Bearer a-SECRET",
                "Cookie": "sid=c-SECRET",
                "Content-Type": "application/json",
                "X-Note": f"tunnel token {token}",
            },
        )
        assert response.status_code == 200
        for side in (admin, agent_side):
            await wait_captured(side, 1)
            detail = await side.get("/api/exchanges/1")
            capture = detail.json()
            # (The response echoes the request as the upstream saw it: only a field name tells a secret.)
            text = json.dumps([capture["path"], capture["request"]])
            assert "SECRET" not in text and token not in text
            headers = dict(capture["request"]["headers"])
            assert headers["Authorization"] == headers["Cookie"] == "[redacted]"
            assert headers["X-Note"] == "tunnel token [redacted]"
            assert capture["path"] == "/echo?access_token=%5Bredacted%5D&page=2"
            shown = json.loads(capture["request"]["body"]["text"])
            assert shown == {"user": "u", "password": "[redacted]", "nested": {"api_key": "[redacted]"}}
            assert capture["request"]["body"]["kind"] == "json"
            assert capture["response"]["status"] == 200
            assert capture["response"]["body"]["kind"] == "json"


async def test_memory_is_bounded_by_n_and_the_body_cap(upstream: Upstream, token: str) -> None:
    args = ("--inspect", "3", "--inspect-max-body", "1K")
    async with (
        inspected_tunnel(upstream, token, relay_args=args, agent_args=()) as (relay, _, relay_admin, _),
        http_client(relay_admin) as admin,
        http_client(relay.http_url) as client,
    ):
        for _ in range(8):
            assert (await client.post("/sha256", content=b"z" * 5000)).status_code == 200
        await wait_captured(admin, 8)
        async with events(admin) as (_, snapshot):
            assert [row["id"] for row in snapshot["inspector"]["rows"]] == [6, 7, 8]
        assert (await admin.get("/api/exchanges/5")).status_code == 404
        body = (await admin.get("/api/exchanges/8")).json()["request"]["body"]
        assert (body["size"], body["captured"], body["truncated"]) == (5000, 1024, True)
        assert body["text"] == "z" * 1024


async def test_replay_needs_the_session_csrf_token_and_makes_a_linked_exchange(
    upstream: Upstream, token: str
) -> None:
    async with (
        inspected_tunnel(upstream, token) as (relay, _, relay_admin, _),
        http_client(relay_admin) as admin,
        http_client(relay.http_url) as client,
    ):
        assert (await client.post("/count/replayed", content=b"one")).status_code == 200
        assert (await client.get("/echo/get")).status_code == 200
        await wait_captured(admin, 2)
        # No session at all, then a session without its token, then a wrong one: refused, nothing sent.
        assert (await admin.post("/api/exchanges/2/replay")).status_code == 403
        csrf = await session(admin)
        assert (await admin.post("/api/exchanges/2/replay")).status_code == 403
        assert (
            await admin.post("/api/exchanges/2/replay", headers={"X-CSRF-Token": "x" + csrf})
        ).status_code == 403
        evil = {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
        assert (await admin.post("/api/exchanges/2/replay", headers=evil)).status_code == 403
        ok = {"X-CSRF-Token": csrf}
        async with events(admin) as (stream, _):
            reply = await admin.post("/api/exchanges/2/replay", headers=ok)
            assert reply.status_code == 202
            update = await stream.until(lambda d: d["rows"])
            (row,) = update["rows"]
            assert (row["replay_of"], row["path"], row["request_id"]) == (
                2,
                "/echo/get",
                reply.json()["request_id"],
            )
            # POST is not idempotent: it needs an explicit confirmation.
            refused = await admin.post("/api/exchanges/1/replay", headers=ok)
            assert refused.status_code == 409 and refused.json()["confirm"] is True
            assert upstream.counts.get("replayed") == 1
            assert (await admin.post("/api/exchanges/1/replay?confirm=1", headers=ok)).status_code == 202
            update = await stream.until(lambda d: d["rows"])
            assert update["rows"][0]["replay_of"] == 1
        assert upstream.counts["replayed"] == 2
        assert (await admin.post("/api/exchanges/99/replay", headers=ok)).status_code == 404
        for odd in ("%C2%B2", "9" * 5000, "-1", "1.0"):  # a unicode digit, an int too long to parse, signs
            assert (await admin.get(f"/api/exchanges/{odd}")).status_code == 404


async def test_the_agent_shows_its_allowlist_and_refusals(upstream: Upstream, token: str) -> None:
    async with (
        inspected_tunnel(upstream, token, allow=["GET /ok/**"]) as (relay, _, _, agent_admin),
        http_client(agent_admin) as admin,
        http_client(relay.http_url) as client,
        events(admin) as (stream, snapshot),
    ):
        assert snapshot["role"] == "agent"
        assert snapshot["info"]["allowlist"] == ["GET /ok/**"]
        assert len(snapshot["status"]["relays"]) == 1
        assert snapshot["inspector"]["replay"] is False
        assert (await client.get("/nope", headers={"X-Request-Id": "refused-1"})).status_code == 403
        update = await stream.until(lambda d: d["refusals"])
        (refusal,) = update["refusals"]
        assert refusal["request_id"] == "refused-1" and "not allowed" in refusal["reason"]
        assert (await admin.post("/api/exchanges/1/replay")).status_code == 404  # no replay on the agent


async def test_the_admin_token_guards_every_path_but_the_probes(upstream: Upstream, token: str) -> None:
    args = ("--inspect", "5", "--admin-token", ADMIN_TOKEN)
    async with (
        inspected_tunnel(upstream, token, relay_args=args, agent_args=()) as (relay, _, relay_admin, _),
        http_client(relay_admin) as admin,
        http_client(relay.http_url) as client,
    ):
        assert (await admin.get("/healthz")).status_code == 200
        assert (await admin.get("/readyz")).status_code == 200
        for path in ("/metrics", "/status.json", "/events", "/api/exchanges/1", "/static/app.js"):
            response = await admin.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert (await admin.get("/")).headers["location"] == "/login"
        assert (await admin.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
        bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert (await admin.get("/metrics", headers=bearer)).status_code == 200
        # The login form: a wrong token, then the right one, which sets the session cookie.
        login = await admin.get("/login")
        assert login.status_code == 200 and 'name="token"' in login.text
        wrong = await admin.post("/login", data={"token": "nope"})
        assert wrong.status_code == 401 and "Wrong token" in wrong.text
        right = await admin.post("/login", data={"token": ADMIN_TOKEN})
        assert right.status_code == 303 and "HttpOnly" in right.headers["set-cookie"]
        assert "SameSite=Strict" in right.headers["set-cookie"]
        assert (await admin.get("/status.json")).status_code == 200  # the cookie now
        assert (await client.get("/echo/x")).status_code == 200
        await wait_captured(admin, 1)
        async with events(admin) as (_, snapshot):
            csrf, assert_logout = snapshot["csrf"], snapshot["logout"]
        assert assert_logout is True
        assert (await admin.post("/api/exchanges/1/replay")).status_code == 403  # the session needs CSRF
        assert (
            await admin.post("/api/exchanges/1/replay", headers={"X-CSRF-Token": csrf})
        ).status_code == 202
        # A Bearer caller sends no cookie, so a forged request cannot carry it: no CSRF token needed.
        fresh = httpx.AsyncClient(base_url=relay_admin, trust_env=False)
        async with fresh:
            assert (await fresh.post("/api/exchanges/1/replay", headers=bearer)).status_code == 202
            assert (await fresh.post("/api/exchanges/1/replay")).status_code == 401
        status = await trio.run_process(
            [*RTUNNEL_CMD, "status", "--admin", relay_admin],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO_ROOT,
            env={"RTUNNEL_ADMIN_TOKEN": ADMIN_TOKEN, "PATH": "/usr/bin:/bin"},
        )
        assert status.returncode == 0, status.stderr
        assert b"1 agent connected" in status.stdout
        assert (await admin.post("/logout", headers={"X-CSRF-Token": csrf})).status_code == 303
        assert (await admin.get("/status.json")).status_code == 401


async def test_without_a_token_only_unrebindable_host_names_reach_the_pages(token: str) -> None:
    async with (
        run_relay(token, extra_args=("--admin", "127.0.0.1:0", "--inspect", "5")) as relay,
        http_client(await admin_url(relay)) as admin,
    ):
        assert (await admin.get("/")).status_code == 200
        assert (await admin.get("/", headers={"Host": "localhost:9180"})).status_code == 200
        # A name an attacker's DNS could point here: a web page must not read captured requests with it.
        for path in ("/", "/events", "/api/exchanges/1"):
            assert (await admin.get(path, headers={"Host": "evil.example:9180"})).status_code == 403
        # A Host that is no name at all is refused the same way (it was a logged traceback, no answer).
        assert (await admin.get("/", headers={"Host": "[::1"})).status_code == 403
        # Probes and scrapes keep working with any name.
        assert (await admin.get("/metrics", headers={"Host": "relay.internal:9180"})).status_code == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--admin", "0.0.0.0:0", "--inspect", "5"), "needs --admin-token"),
        (("--inspect", "5"), "--inspect needs --admin"),
        (("--admin", "127.0.0.1:0", "--admin-token", "short"), "at least 16 characters"),
    ],
)
async def test_start_up_refusals_are_one_line(args: tuple[str, ...], message: str) -> None:
    for command in ("serve", "dial"):
        extra = ["ws://127.0.0.1:9", "--upstream", "http://127.0.0.1:9"] if command == "dial" else []
        result = await trio.run_process(
            [*RTUNNEL_CMD, command, *extra, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO_ROOT,
            env={"PATH": "/usr/bin:/bin"},
        )
        lines = result.stderr.decode().splitlines()
        assert result.returncode == 2, lines
        assert len(lines) == 1 and message in lines[0], lines


async def test_a_token_lets_the_inspector_listen_beyond_loopback(token: str) -> None:
    args = ("--admin", "0.0.0.0:0", "--inspect", "5", "--admin-token", ADMIN_TOKEN)
    async with run_relay(token, extra_args=args) as relay:
        url = (await admin_url(relay)).replace("0.0.0.0", "127.0.0.1")
        async with http_client(url) as admin:
            assert (await admin.get("/status.json")).status_code == 401
            bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            assert (await admin.get("/status.json", headers=bearer)).status_code == 200


async def test_event_streams_are_bounded_and_give_their_slot_back(token: str) -> None:
    async with (
        run_relay(token, extra_args=("--admin", "127.0.0.1:0")) as relay,
        http_client(await admin_url(relay)) as admin,
        AsyncExitStack() as open_streams,
    ):
        streams = [await open_streams.enter_async_context(events(admin)) for _ in range(8)]
        assert len(streams) == 8
        refused = await admin.get("/events")
        assert refused.status_code == 503 and refused.headers["retry-after"]
        # A page left open does not lock out the scraper.
        assert (await admin.get("/metrics")).status_code == 200
        await open_streams.aclose()  # every page closed: the slots come back once the server sees the EOF
        with trio.fail_after(10):
            while True:
                async with admin.stream("GET", "/events") as response:
                    if response.status_code == 200:
                        break


async def test_a_session_cookie_behind_a_tls_proxy_is_secure(token: str) -> None:
    async with (
        run_relay(token, extra_args=("--admin", "127.0.0.1:0")) as relay,
        http_client(await admin_url(relay)) as admin,
    ):
        assert "Secure" not in (await admin.get("/")).headers["set-cookie"]
        admin.cookies.clear()
        behind_tls = await admin.get("/", headers={"X-Forwarded-Proto": "https"})
        assert behind_tls.headers["set-cookie"].endswith("; Secure")


async def test_a_token_added_on_sighup_is_redacted_too(upstream: Upstream, tmp_path: Path) -> None:
    first, added = new_token(), new_token()
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{first}\n")
    args = ("--token-file", str(token_file), "--admin", "127.0.0.1:0", "--inspect", "5")
    async with (
        run_relay(None, extra_args=args) as relay,
        run_agent(relay.agents_url, upstream.url, token=first),
        http_client(await admin_url(relay)) as admin,
        http_client(relay.http_url) as client,
    ):
        await relay.wait_for_line("agent connected from")
        token_file.write_text(f"{first}\n{added}\n")
        relay.send_signal(signal.SIGHUP)
        await relay.wait_for_line("tokens reloaded")
        note = f"old {first} new {added}"
        assert (await client.get("/echo/x", headers={"X-Note": note})).status_code == 200
        await wait_captured(admin, 1)
        headers = dict((await admin.get("/api/exchanges/1")).json()["request"]["headers"])
        assert headers["X-Note"] == "old [redacted] new [redacted]"
