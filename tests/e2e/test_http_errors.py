"""End to end: what clients get when something is wrong, through real `rtunnel serve` / `rtunnel dial`.

No agent (yet), a wrong token, the allowlist and its bypass attempts, a down or slow upstream, malformed and
smuggling-shaped requests, and clients that leave mid-exchange. Requests whose exact bytes matter go over a
raw socket (httpx would normalize them); every check reads the real status and body.
"""

from __future__ import annotations

import re

import pytest
import trio

from ..ports import refused_port
from .procs import REFUSED_TOKEN_RE, Agent, Relay, http_client, run_agent, run_relay
from .rawhttp import open_raw, request_bytes
from .upstream import Upstream, payload

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def assert_clean_log(*procs: Agent | Relay) -> None:
    for proc in procs:
        assert "Traceback" not in proc.log_text(), proc.log_text()


# --- agents: not yet there, never there, wrong token ------------------------------------------------


async def test_request_sent_before_the_agent_connects_succeeds(upstream: Upstream, token: str) -> None:
    # A generous --agent-wait: the agent process must start within it, even on a loaded machine.
    async with run_relay(token, extra_args=["--agent-wait", "60"]) as relay, open_raw(relay.http_port) as raw:
        # The whole request is on the relay's socket before the agent process even exists.
        await raw.send(request_bytes("GET", "/echo/early"))
        async with run_agent(relay.agents_url, upstream.url, token=token):
            r = await raw.response()
            assert r.status == 200
            assert r.json()["target"] == "/echo/early"
    assert upstream.paths == ["/echo/early"]


async def test_no_agent_and_wrong_token_get_503_and_the_token_is_never_logged(
    upstream: Upstream, token: str
) -> None:
    wrong = "wrong-" + token[::-1]
    async with run_relay(token, extra_args=["--agent-wait", "0.2"]) as relay:
        # No agent at all: 503 once --agent-wait is over, with Retry-After and a body saying why.
        async with http_client(relay.http_url) as c:
            r = await c.get("/anything")
            assert r.status_code == 503
            assert int(r.headers["retry-after"]) > 0
            assert "agent" in r.text
            # The connection was not poisoned: the next request on it gets the same clean answer.
            r = await c.post("/anything", content=b"body")
            assert r.status_code == 503

        # An agent with the wrong token: refused at the upgrade, and it says so.
        async with run_agent(relay.agents_url, upstream.url, token=wrong, wait_connected=False) as agent:
            line = (await agent.wait_for_line(REFUSED_TOKEN_RE)).string
            assert "token" in line.lower(), line
            rejection = (await relay.wait_for_line(re.compile(r"reject", re.IGNORECASE))).string
            assert "token" in rejection or "401" in rejection, rejection
            async with http_client(relay.http_url) as c:
                r = await c.get("/echo")
                assert r.status_code == 503
                assert "retry-after" in r.headers
            assert relay.count_lines("agent connected") == 0
    for proc in (relay, agent):
        text = proc.log_text()
        assert token not in text and wrong not in text, f"a token leaked into the {proc.name} log"
    assert_clean_log(relay, agent)
    assert upstream.paths == []


# --- allowlist ----------------------------------------------------------------------------------------------


async def test_allowlist_allows_denies_and_resists_bypasses(
    relay: Relay, upstream: Upstream, token: str
) -> None:
    allow = ["GET /api/**", "POST /api/orders"]
    async with run_agent(relay.agents_url, upstream.url, token=token, allow=allow) as agent:

        async def ask(method: str, target: str, body: bytes = b"") -> tuple[int, str]:
            headers = [("Content-Length", str(len(body)))] if body else []
            async with open_raw(relay.http_port) as raw:
                await raw.send(request_bytes(method, target, headers, body))
                r = await raw.response(method)
            return r.status, r.text

        # Allowed, forwarded in the normalized form that was checked.
        allowed = {
            ("GET", "/api/items"): "/api/items",
            ("GET", "/api/items?q=../../admin"): "/api/items?q=../../admin",
            ("GET", "/api/./x"): "/api/x",
            ("GET", "/api//y"): "/api/y",
            ("GET", "/ap%69/z"): "/api/z",
            ("POST", "/api/orders"): "/api/orders",
        }
        for (method, target), forwarded in allowed.items():
            status, text = await ask(method, target, b"order" if method == "POST" else b"")
            assert status == 200, (method, target, text)
            assert text == forwarded, (method, target)

        # Denied: 403 with a body that says what and why.
        for method, target in [("GET", "/admin"), ("POST", "/api/items"), ("DELETE", "/api/orders")]:
            status, text = await ask(method, target)
            assert status == 403, (method, target, text)
            assert "not allowed" in text and "no allow rule matches" in text, text

        # Bypass attempts: each one resolves to /admin (403) or is refused outright (400).
        bypasses = {
            "/api/../admin": 403,
            "/api/%2e%2e/admin": 403,
            "/api/%2E%2E/admin": 403,
            "/api/.%2e/admin": 403,
            "/api/x/../../admin": 403,
            "//admin": 403,
            "/%61dmin": 403,
            "/api/%2fadmin": 400,
            "/api/%2Fadmin": 400,
            "/api/%2e%2e%2fadmin": 400,
            "/api\\..\\admin": 400,
        }
        for target, expected in bypasses.items():
            status, text = await ask("GET", target)
            assert status == expected, (target, status, text)
            assert text.startswith("rtunnel agent:"), text
        await agent.wait_count(re.compile(" 40[03] "), len(bypasses))

    forwarded_paths = sorted(allowed.values())
    assert sorted(upstream.paths) == forwarded_paths
    for path in upstream.paths:
        low = path.split("?")[0].lower()
        assert low.startswith("/api/") and ".." not in low and "%2" not in low and "//" not in low, path


# --- upstream failures -------------------------------------------------------------------------------------


async def test_upstream_down_is_502_and_too_slow_is_504(relay: Relay, upstream: Upstream, token: str) -> None:
    with refused_port() as port:
        down = f"http://127.0.0.1:{port}"
        async with run_agent(relay.agents_url, down, token=token) as agent, http_client(relay.http_url) as c:
            r = await c.get("/echo")
            assert r.status_code == 502
            assert "refused" in r.text.lower() or "connect" in r.text.lower(), r.text
            r = await c.post("/sha256", content=b"x" * 1000)
            assert r.status_code == 502
    assert_clean_log(agent)

    # The timeout also bounds the wait for the 200 below: it must be long enough for a loaded machine to get
    # the upstream's answer through three processes.
    async with (
        run_agent(
            relay.agents_url, upstream.url, token=token, extra_args=["--response-timeout", "3"]
        ) as agent,
        http_client(relay.http_url) as c,
    ):
        r = await c.get("/sleep?s=60")
        assert r.status_code == 504
        assert "no response within 3 s" in r.text, r.text
        # The agent is fine afterwards.
        r = await c.get("/bytes/1000")
        assert (r.status_code, r.content) == (200, payload(1000))
    assert_clean_log(agent, relay)


# --- malformed and smuggling-shaped requests ---------------------------------------------------------------


async def test_malformed_requests_are_refused_and_the_connection_closed(
    relay: Relay, agent: Agent, upstream: Upstream
) -> None:
    big = "a" * 40_000
    cases: list[tuple[str, bytes, int]] = [
        ("garbage request line", b"GARBAGE\r\n\r\n", 400),
        ("header without colon", b"GET /x HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n", 400),
        ("space in target", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (
            "bad chunk size",
            b"POST /sha256 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
        ),
        ("oversized head", request_bytes("GET", "/x", [("X-Big", big)]), 431),
        ("too many headers", request_bytes("GET", "/x", [(f"X-H{i}", "v") for i in range(300)]), 431),
        (
            "Content-Length and Transfer-Encoding",
            request_bytes(
                "POST", "/sha256", [("Content-Length", "5"), ("Transfer-Encoding", "chunked")], b"0\r\n\r\n"
            ),
            400,
        ),
        ("HTTP/2.0 request line", b"GET /x HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        ("HTTP/3 request line", b"GET /x HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    ]
    for name, data, status in cases:
        async with open_raw(relay.http_port) as raw:
            await raw.send(data)
            r = await raw.response()
            assert r.status == status, (name, r.status, r.text)
            assert r.body, name  # a short text saying why
            assert await raw.closed(), f"{name}: connection left open"
    # A head that grows past the limit a little at a time (the relay sees it incomplete and too big).
    async with open_raw(relay.http_port) as raw:
        await raw.send(b"GET /x HTTP/1.1\r\nHost: x\r\n")
        try:
            for i in range(100):
                await raw.send(f"X-Pad-{i}: {'b' * 1000}\r\n".encode())
        except trio.BrokenResourceError:
            pass  # the relay answered and closed while we were still sending
        r = await raw.response()
        assert r.status == 431
    # None of them reached the upstream; a good request still works.
    assert upstream.paths == []
    async with open_raw(relay.http_port) as raw:
        await raw.send(request_bytes("GET", "/fine"))
        assert (await raw.response()).status == 200
    assert upstream.paths == ["/fine"]


# --- clients that leave mid-exchange ------------------------------------------------------------------------


async def test_client_leaving_mid_exchange_cancels_only_its_own(
    relay: Relay, agent: Agent, upstream: Upstream
) -> None:
    async with (
        http_client(relay.http_url) as bystander_client,
        bystander_client.stream("GET", "/hold/bystander") as bystander,
    ):
        bystander_chunks = bystander.aiter_raw()
        assert await bystander_chunks.__anext__() == b"held\n"

        # Mid-upload: 1 MiB of a declared 8 MiB body, then gone.
        mark = agent.mark()
        async with open_raw(relay.http_port) as raw:
            await raw.send(request_bytes("POST", "/sha256", [("Content-Length", str(8 * MiB))]))
            await raw.send(payload(MiB))
        line = await agent.wait_for_line(re.compile(r"POST /sha256 .*\(.*(reset|cancel)"), since=mark)
        assert "CANCEL" in line.string or "cancel" in line.string, line.string

        # Mid-download of a streamed response: the first chunk, then gone.
        mark = agent.mark()
        async with open_raw(relay.http_port) as raw:
            await raw.send(request_bytes("GET", "/hold/left"))
            await raw.read_until(b"held\n")
        await agent.wait_for_line(re.compile(r"GET /hold/left .*\(.*(reset|cancel)"), since=mark)
        upstream.state.release("left")  # its upstream connection is gone: nobody reads this

        # Mid-download of a large body (held back by flow control): 1 MiB of 50 MB, then gone.
        mark = agent.mark()
        async with open_raw(relay.http_port) as raw:
            await raw.send(request_bytes("GET", "/bytes/50000000"))
            await raw.read_at_least(MiB)
        await agent.wait_for_line(re.compile(r"GET /bytes/50000000 .*\(.*(reset|cancel)"), since=mark)

        # A new connection works, and the exchange that stayed was not disturbed.
        r = await bystander_client.get("/bytes/1000")
        assert (r.status_code, r.content) == (200, payload(1000))
        async with http_client(relay.http_url) as other:
            r = await other.post("/sha256", content=b"after")
            assert r.json()["length"] == 5
        upstream.state.release("bystander")
        rest = b"".join([chunk async for chunk in bystander_chunks])
        assert rest == b"released\n"
    # The relay's access log blames the client (499) for the upload it abandoned, not the upstream.
    assert await relay.wait_count(re.compile(r"POST /sha256 499 "), 1) == 1
    assert_clean_log(relay, agent)
