"""`rtunnel dial --app`: real Flask (WSGI) and Starlette (ASGI) apps in real agent processes behind a real relay.

The apps are tests/e2e/apps/*.py; they log "testapp: ..." lines to the agent's stderr where a test needs to
see what they saw (an iterable closed, a disconnect, lifespan steps).
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
import trio_websocket

from .procs import RTUNNEL_CMD, Agent, Relay, http_client, run_process

pytestmark = pytest.mark.e2e

APP_DIR = "tests/e2e/apps"
BLOCK = bytes(range(256)) * 256
BIG_BLOCKS = 800  # 50 MiB


@asynccontextmanager
async def run_app_agent(
    relay: Relay, app: str, *, token: str, extra_args: Sequence[str] = (), wait_connected: bool = True
) -> AsyncIterator[Agent]:
    args = [*RTUNNEL_CMD, "dial", relay.agents_url, "--app", app, "--app-dir", APP_DIR, "--token", token]
    async with run_process(Agent, "agent", [*args, *extra_args]) as agent:
        if wait_connected:
            await agent.wait_connected()
        yield agent


def big_digest(blocks: int) -> str:
    digest = hashlib.sha256()
    for _ in range(blocks):
        digest.update(BLOCK)
    return digest.hexdigest()


async def test_flask_app_in_the_agent(relay: Relay, token: str) -> None:
    allow = ["GET /hello", "POST /sha", "GET /forever", "GET /raise", "GET /hang"]
    # /hang sleeps 3 s, so it is past a 2 s --response-timeout whatever the load; every other route has 2 s
    # from its last body read to its head, a margin a loaded machine needs more than 1 s would leave.
    options = [arg for rule in allow for arg in ("--allow", rule)] + ["--response-timeout", "2"]
    async with (
        run_app_agent(relay, "flask_app:app", token=token, extra_args=options) as agent,
        http_client(relay.http_url) as client,
    ):
        hello = await client.get("/hello", headers={"X-Forwarded-Proto": "https"})
        assert hello.json() == {
            "hello": "flask",
            "remote": "127.0.0.1",
            "scheme": "http",  # the relay's own view, not the client's claim
            "host": f"127.0.0.1:{relay.http_port}",
        }

        async def upload() -> AsyncIterator[bytes]:
            for _ in range(BIG_BLOCKS):
                yield BLOCK

        sha = await client.post("/sha", content=upload(), timeout=120)
        assert sha.json() == {"sha256": big_digest(BIG_BLOCKS), "size": BIG_BLOCKS * len(BLOCK)}

        assert (await client.get("/admin")).status_code == 403
        assert agent.count_lines("testapp: admin reached") == 0

        mark = agent.mark()
        assert (await client.get("/raise")).status_code == 500
        await agent.wait_for_line("ZeroDivisionError: testapp boom", since=mark)
        assert agent.count_lines("Traceback", since=mark) == 1

        timed_out = await client.get("/hang")
        assert timed_out.status_code == 504

        mark = agent.mark()
        async with client.stream("GET", "/forever") as response:
            await anext(response.aiter_raw())
        await agent.wait_for_line("testapp: iterable closed", since=mark)
        assert (await client.get("/hello")).status_code == 200  # the agent serves on


async def test_starlette_app_in_the_agent(relay: Relay, token: str) -> None:
    async with run_app_agent(relay, "starlette_app:app", token=token, wait_connected=False) as agent:
        started = await agent.wait_for_line("testapp: startup complete")
        await agent.wait_connected()
        assert agent.stderr_lines.index(started.string) < agent.stderr_lines.index(
            next(line for line in agent.stderr_lines if "connected to" in line)
        )
        async with http_client(relay.http_url) as client:
            assert (await client.get("/hello")).json() == {"hello": "starlette", "client": "127.0.0.1"}

            digest = hashlib.sha256()
            size = 0
            async with client.stream("GET", f"/download/{BIG_BLOCKS}", timeout=120) as response:
                async for chunk in response.aiter_raw():
                    digest.update(chunk)
                    size += len(chunk)
            assert (size, digest.hexdigest()) == (BIG_BLOCKS * len(BLOCK), big_digest(BIG_BLOCKS))

            async with client.stream("GET", "/events") as response:
                chunks = response.aiter_raw()
                assert await anext(chunks) == b"data: one\n\n"
                assert (await client.get("/release")).text == "released"
                assert await anext(chunks) == b"data: two\n\n"

            mark = agent.mark()
            async with client.stream("GET", "/forever/") as response:
                await anext(response.aiter_raw())
            await agent.wait_for_line("testapp: client disconnected", since=mark)

            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{relay.http_port}/ws") as ws:
                for text in ("one", "two"):
                    await ws.send_message(text)
                    assert await ws.get_message() == f"echo {text}"

            # SIGTERM while an exchange is in flight: it finishes, then the lifespan shutdown runs.
            async with trio.open_nursery() as nursery:
                result: list[httpx.Response] = []

                async def slow() -> None:
                    result.append(await client.get("/slow"))

                mark = agent.mark()
                nursery.start_soon(slow)
                await agent.wait_for_line("testapp: slow started", since=mark)
                agent.send_signal(signal.SIGTERM)
            assert result[0].text == "slow done"
            assert await agent.wait_exit() == 0
            lines = agent.stderr_lines
            finished = next(i for i, line in enumerate(lines) if "GET /slow 200" in line)
            assert finished < next(i for i, line in enumerate(lines) if "testapp: shutdown" in line)


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        ("nosuchmodule:app", "module 'nosuchmodule' not found"),
        ("flask_app", "expected MODULE:ATTR"),
        ("flask_app:nope", "module 'flask_app' has no attribute 'nope'"),
        ("flask_app:NOT_AN_APP", "is not callable (int): neither a WSGI nor an ASGI application"),
        ("broken_app:app", "importing 'broken_app' failed: RuntimeError: testapp: no configuration"),
    ],
)
def test_bad_app_values_exit_2_with_one_line(app: str, expected: str) -> None:
    args = [sys.executable, "-m", "rtunnel", "dial", "ws://127.0.0.1:9", "--app", app, "--app-dir", APP_DIR]
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rtunnel dial: error: ") and expected in lines[0]
    debug = subprocess.run(
        [*args[:3], "--log-level", "debug", *args[3:]],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert debug.returncode == 2
    assert ("Traceback" in debug.stderr) == (
        app not in ("flask_app", "flask_app:nope", "flask_app:NOT_AN_APP")
    )


@pytest.mark.parametrize("both", [True, False])
def test_exactly_one_of_upstream_and_app(both: bool) -> None:
    args = [sys.executable, "-m", "rtunnel", "dial", "ws://127.0.0.1:9"]
    if both:
        args += ["--upstream", "http://127.0.0.1:1", "--app", "flask_app:app", "--app-dir", APP_DIR]
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "rtunnel dial: error: give exactly one of --upstream URL and --app MODULE:ATTR"
    )


async def test_django_app_in_the_agent_behind_a_named_tunnel_prefix(token: str) -> None:
    from .procs import run_relay

    async with (
        run_relay(token, extra_args=["--tunnel", "site=prefix:/site"]) as relay,
        run_app_agent(relay, "django_app:application", token=token, extra_args=["--tunnel", "site"]),
        http_client(relay.http_url) as client,
    ):
        hello = await client.get("/site/hello")
        assert hello.json() == {
            "hello": "django",
            "remote": "127.0.0.1",
            "script_name": "/site",
            "path": "/site/hello",  # Django puts SCRIPT_NAME back in front: its links go through the tunnel
            "absolute": f"http://127.0.0.1:{relay.http_port}/site/hello",
        }
        body = b"django" * 100_000
        sha = await client.post("/site/sha", content=body)
        assert sha.json() == {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
