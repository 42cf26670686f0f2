"""End to end: HTTP exchanges through real `rtunnel serve` and `rtunnel dial` processes.

Every body is checked byte for byte (SHA-256 against the upstream's deterministic payloads, or the digest the
upstream computed of what it received). Ordering claims (streaming, pipelining, 100-continue) are checked by
events (a chunk read before the upstream was allowed to produce the next), never by timing.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import trio

from .procs import Agent, Relay, http_client, run_agent, run_relay
from .rawhttp import open_raw, request_bytes
from .upstream import Upstream, iter_payload, payload, payload_sha256

pytestmark = pytest.mark.e2e

KiB = 1024
MiB = 1024 * KiB
SIZES = [0, 1, 64 * KiB, MiB]
BIG = 50_000_000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def download_digest(client: httpx.AsyncClient, path: str) -> tuple[httpx.Response, str, int]:
    """Stream a GET, hashing as it comes (nothing held whole)."""
    digest = hashlib.sha256()
    length = 0
    async with client.stream("GET", path) as r:
        async for chunk in r.aiter_bytes():
            digest.update(chunk)
            length += len(chunk)
    return r, digest.hexdigest(), length


async def agen(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


# --- bodies of every size, both directions ----------------------------------------------------------


async def test_bodies_of_every_size_in_both_directions(client: httpx.AsyncClient) -> None:
    for n in SIZES:
        r, digest, length = await download_digest(client, f"/bytes/{n}")
        assert r.status_code == 200
        assert r.headers["content-length"] == str(n)
        assert (length, digest) == (n, payload_sha256(n)), f"GET /bytes/{n}"

        body = payload(n)
        for method in ("POST", "PUT"):
            r = await client.request(method, "/sha256", content=body)
            assert r.status_code == 200
            assert r.json() == {"sha256": sha(body), "length": n}, f"{method} /sha256 {n} B"
        # Any method may carry a body: /echo reports the digest of what the upstream received.
        for method in ("GET", "POST", "PUT", "DELETE"):
            r = await client.request(method, f"/echo/{n}", content=body)
            assert r.status_code == 200
            seen = r.json()
            assert seen["method"] == method
            assert (seen["body_length"], seen["body_sha256"]) == (n, sha(body)), f"{method} /echo {n} B"
            # The response body itself arrived whole: it is exactly what the upstream serialized.
            assert r.headers["content-length"] == str(len(r.content))

    # 50 MB, once each way.
    expected = payload_sha256(BIG)
    r, digest, length = await download_digest(client, f"/bytes/{BIG}")
    assert r.status_code == 200
    assert (length, digest) == (BIG, expected)

    # Streamed from a generator, with a declared length: the relay must not buffer it whole either.
    r = await client.post(
        "/sha256",
        content=agen(iter_payload(BIG)),
        headers={"Content-Length": str(BIG)},
    )
    assert r.status_code == 200
    assert r.json() == {"sha256": expected, "length": BIG}


# --- concurrency ---------------------------------------------------------------------------------------


async def test_500_concurrent_requests_over_one_agent(upstream: Upstream, token: str) -> None:
    # More requests than the agent's concurrent-stream limit (256 by default): the rest queue in the relay
    # and must start as slots free up. A huge --agent-wait makes a lost wakeup hang (and fail on the
    # clients' timeout) instead of being papered over when the wait runs out.
    async with (
        run_relay(token, extra_args=["--agent-wait", "600"]) as relay,
        run_agent(relay.agents_url, upstream.url, token=token) as agent,
    ):
        await _500_concurrent_requests(relay, agent, upstream)


async def _500_concurrent_requests(relay: Relay, agent: Agent, upstream: Upstream) -> None:
    sizes = [0, 1, 1000, 16 * KiB + 3, 64 * KiB, 100 * KiB + 17]
    digests = {n: payload_sha256(n) for n in sizes}
    # Uploads are not the download payload, so a response crossed with another stream cannot pass.
    uploads = {n: payload(n)[::-1] for n in sizes}
    results: dict[int, str] = {}
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)

    async def one(c: httpx.AsyncClient, i: int) -> None:
        n = sizes[i % len(sizes)]
        kind = i % 3
        if kind == 0:
            r, digest, length = await download_digest(c, f"/bytes/{n}?i={i}")
            assert r.status_code == 200
            assert (length, digest) == (n, digests[n]), f"request {i}"
        elif kind == 1:
            r, digest, length = await download_digest(c, f"/chunked/{n}?i={i}")
            assert r.status_code == 200
            assert (length, digest) == (n, digests[n]), f"request {i}"
        else:
            body = uploads[n]
            r = await c.post(f"/sha256?i={i}", content=body)
            assert r.status_code == 200
            assert r.json() == {"sha256": sha(body), "length": n}, f"request {i}"
        results[i] = "ok"

    # Ten clients of 50 connections each, each from its own loopback address (127.0.0.2 to .11): all 500
    # requests are in flight at once, as from ten hosts, so the relay's per-address limits (a defence
    # against one abusive client) do not apply; and httpcore's pool, whose bookkeeping grows with its
    # size squared, does not become the bottleneck of the test.
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                http_client(
                    relay.http_url,
                    transport=httpx.AsyncHTTPTransport(limits=limits, local_address=f"127.0.0.{k + 2}"),
                    timeout=60,
                )
            )
            for k in range(10)
        ]
        async with trio.open_nursery() as nursery:
            for i in range(500):
                nursery.start_soon(one, clients[i % 10], i)
    assert len(results) == 500
    # All of them went through the one agent, and each reached the upstream exactly once.
    assert await agent.wait_count("rtunnel.agent.access", 500) == 500
    assert sorted(int(p.rsplit("i=", 1)[1]) for p in upstream.paths) == list(range(500))
    assert await relay.wait_count(re.compile(r"relay\.access: .* 200 in="), 500) == 500


# --- streaming -------------------------------------------------------------------------------------------


async def test_chunked_upload_and_chunked_download(client: httpx.AsyncClient) -> None:
    for n in (1, 64 * KiB + 1, MiB + 5):
        r, digest, length = await download_digest(client, f"/chunked/{n}")
        assert r.status_code == 200
        assert r.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in r.headers
        assert (length, digest) == (n, payload_sha256(n))

    for n in (0, 1, 64 * KiB, MiB + 3):
        r = await client.post("/sha256", content=agen(iter_payload(n)))  # no length: httpx sends it chunked
        assert r.status_code == 200
        assert r.json() == {"sha256": payload_sha256(n), "length": n}

    # Odd chunk sizes, and the framing the upstream saw: chunked, no Content-Length.
    body = payload(300_001)
    chunks = [body[i : i + 7777] for i in range(0, len(body), 7777)]
    r = await client.put("/echo/chunked", content=agen(chunks))
    seen = r.json()
    names = [name.lower() for name, _ in seen["headers"]]
    assert ["transfer-encoding", "chunked"] in [[k.lower(), v.lower()] for k, v in seen["headers"]]
    assert "content-length" not in names
    assert (seen["body_length"], seen["body_sha256"]) == (len(body), sha(body))


async def test_streamed_responses_pass_as_they_are_produced(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    # /hold sends "held\n" and then waits: the upstream cannot produce the rest until we release it, so
    # reading the first chunk proves the relay and agent forwarded it without waiting for the end.
    async with client.stream("GET", "/hold/stream") as r:
        assert r.status_code == 200
        received = b""
        chunks = r.aiter_raw()
        while not received.endswith(b"\n"):
            received += await chunks.__anext__()
        assert received == b"held\n"
        upstream.state.release("stream")
        async for chunk in chunks:
            received += chunk
    assert received == b"held\nreleased\n"

    # Server-sent events, event by event.
    n = 3
    async with client.stream("GET", f"/sse?n={n}&interval=0.5") as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert "content-length" not in r.headers
        text = ""
        arrivals: list[str] = []  # what had arrived when each event became complete
        async for piece in r.aiter_text():
            text += piece
            while text.count("\n\n") > len(arrivals):
                arrivals.append(text)
    events = [e for e in text.split("\n\n") if e]
    assert events == [f"id: {i}\ndata: event {i}" for i in range(n)]
    # The first event was delivered on its own, before the upstream had produced the last one.
    assert "event 0" in arrivals[0]
    assert f"event {n - 1}" not in arrivals[0]


# --- connection handling --------------------------------------------------------------------------------


async def test_keep_alive_pipelining_head_204_304(relay: Relay, agent: Agent, upstream: Upstream) -> None:
    async with open_raw(relay.http_port) as raw:
        # Several requests one after the other on the same client connection.
        for i in range(3):
            await raw.send(request_bytes("GET", f"/echo/ka{i}"))
            r = await raw.response()
            assert r.status == 200
            assert r.json()["target"] == f"/echo/ka{i}"

        # Pipelined: all sent in one write, answered in order, each framed right.
        body = payload(70_000)
        pipeline = [
            ("GET", "/echo/p1", [], b""),
            ("POST", "/sha256", [("Content-Length", str(len(body)))], body),
            ("HEAD", "/bytes/1000", [], b""),
            ("GET", "/status/204", [], b""),
            ("GET", "/status/304", [], b""),
            ("GET", "/chunked/70000", [], b""),
            ("HEAD", "/chunked/5", [], b""),
            ("DELETE", "/echo/p2", [], b""),
        ]
        await raw.send(b"".join(request_bytes(m, t, h, b) for m, t, h, b in pipeline))
        responses = [await raw.response(method) for method, _, _, _ in pipeline]

        assert responses[0].status == 200
        assert responses[0].json()["target"] == "/echo/p1"
        assert responses[1].json() == {"sha256": sha(body), "length": len(body)}
        head = responses[2]
        assert (head.status, head.get("content-length"), head.body) == (200, b"1000", b"")
        for r, status in ((responses[3], 204), (responses[4], 304)):
            assert (r.status, r.body) == (status, b"")
            assert r.get("transfer-encoding") is None
        assert responses[5].status == 200
        assert responses[5].body == payload(70_000)
        assert (responses[6].status, responses[6].body) == (200, b"")
        assert responses[7].json()["method"] == "DELETE"
        assert responses[7].json()["target"] == "/echo/p2"

        # Still open and usable after all that.
        await raw.send(request_bytes("GET", "/bytes/10"))
        r = await raw.response()
        assert r.body == payload(10)
    paths = upstream.paths
    assert paths.index("/echo/p1") < paths.index("/sha256") < paths.index("/echo/p2")


async def test_expect_100_continue(relay: Relay, agent: Agent, tmp_path: Path) -> None:
    # Raw: the interim 100 arrives before a single body byte was sent, then the body goes through.
    body = payload(200_000)
    async with open_raw(relay.http_port) as raw:
        head = request_bytes(
            "POST", "/sha256", [("Content-Length", str(len(body))), ("Expect", "100-continue")]
        )
        await raw.send(head)
        assert await raw.interim() == 100
        await raw.send(body)
        r = await raw.response("POST")
        assert r.status == 200
        assert r.json() == {"sha256": sha(body), "length": len(body)}

    # curl waits for the 100 (up to --expect100-timeout) before sending the body; its trace shows the 100.
    curl = shutil.which("curl")
    assert curl is not None, "curl is required for the e2e tests (.ci/run installs it)"
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload(MiB + 1))
    result = await trio.run_process(
        [
            curl,
            "-sS",
            "-v",
            "--expect100-timeout",
            "30",  # without a 100 curl would wait this long: the test would fail on its time budget
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            f"@{upload}",
            "-w",
            "\n%{http_code}",
            f"{relay.http_url}/sha256",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    trace = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, trace
    reply, _, code = result.stdout.decode().rpartition("\n")
    assert code == "200", trace
    assert json.loads(reply) == {"sha256": payload_sha256(MiB + 1), "length": MiB + 1}
    interim = [line for line in trace.splitlines() if line.startswith("< HTTP/1.1 1")]
    assert [line.split()[2] for line in interim] == ["100"], trace


# --- proxy semantics --------------------------------------------------------------------------------------


async def test_proxy_headers(relay: Relay, client: httpx.AsyncClient) -> None:
    sent = [
        ("Host", "Public.Example:8080"),
        ("X-First", "1"),
        ("Connection", "keep-alive, X-Custom"),
        ("X-Custom", "hop-only"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Dup", "a"),
        ("X-MiXeD-Case", "v"),
        ("X-Dup", "b"),
        ("X-Forwarded-For", "10.1.2.3"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
        ("Via", "1.0 corp-proxy"),
        ("X-Last", "z"),
    ]
    async with open_raw(relay.http_port) as raw:
        await raw.send(request_bytes("GET", "/echo/headers?q=1", sent))
        r = await raw.response()
    assert r.status == 200
    seen = r.json()
    assert seen["target"] == "/echo/headers?q=1"
    headers = [(k, v) for k, v in seen["headers"]]
    names = {k.lower() for k, _ in headers}
    for hop in ("connection", "x-custom", "keep-alive", "te", "upgrade", "proxy-connection"):
        assert hop not in names, f"hop-by-hop header {hop} reached the upstream: {headers}"

    def values(name: str) -> list[str]:
        return [v for k, v in headers if k.lower() == name]

    # End-to-end headers: same names (case kept), same values, same order, duplicates kept.
    e2e = {"host", "x-first", "x-dup", "x-mixed-case", "x-last"}
    assert [(k, v) for k, v in headers if k.lower() in e2e] == [
        ("Host", "Public.Example:8080"),
        ("X-First", "1"),
        ("X-Dup", "a"),
        ("X-MiXeD-Case", "v"),
        ("X-Dup", "b"),
        ("X-Last", "z"),
    ]
    assert values("x-forwarded-for") == ["10.1.2.3, 127.0.0.1"]
    assert values("x-forwarded-proto") == ["http"]
    assert values("x-forwarded-host") == ["Public.Example:8080"]
    via = values("via")
    assert len(via) == 1
    assert via[0].startswith("1.0 corp-proxy, ")
    assert "rtunnel" in via[0].split(", ")[-1]
    # The response names this hop too.
    assert any(b"rtunnel" in value for value in r.get_all("Via"))

    # The same through httpx, with a Host that is not the relay's address.
    seen = (await client.get("/echo/host", headers={"Host": "service.internal:1234"})).json()
    assert [v for k, v in seen["headers"] if k.lower() == "host"] == ["service.internal:1234"]
    assert [v for k, v in seen["headers"] if k.lower() == "x-forwarded-host"] == ["service.internal:1234"]
