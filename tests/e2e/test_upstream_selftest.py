"""Tests of the test upstream itself (tests/e2e/upstream.py), with httpx, directly: no tunnel involved."""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import AsyncIterator

import h11
import httpx
import pytest
import trio

from ..ports import reserved_port
from .procs import http_client, run_upstream_process
from .upstream import Upstream, first_mismatch, iter_payload, payload, payload_sha256


@pytest.fixture
async def direct(upstream: Upstream) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(upstream.url) as c:
        yield c


@pytest.mark.parametrize("n", [0, 1, 1000, 65536, 65537, 3 * 65536 + 17])
async def test_bytes_content_length(direct: httpx.AsyncClient, n: int) -> None:
    r = await direct.get(f"/bytes/{n}")
    assert r.status_code == 200
    assert r.headers["content-length"] == str(n)
    assert "transfer-encoding" not in r.headers
    assert r.content == payload(n)


async def test_chunked_same_bytes(direct: httpx.AsyncClient) -> None:
    n = 200_000
    r = await direct.get(f"/chunked/{n}")
    assert r.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in r.headers
    assert r.content == payload(n)


async def test_payload_is_deterministic_and_position_stamped() -> None:
    n = 5 * 65536
    data = payload(n)
    assert data == payload(n) and len(data) == n
    assert payload(n + 1)[:n] != data  # another N, another seed
    assert payload_sha256(n) == hashlib.sha256(data).hexdigest()
    assert first_mismatch(data, n) is None
    # Swapping two whole 64 KiB chunks would go unseen with a plain repeated block; not here.
    chunks = list(iter_payload(n))
    swapped = b"".join([chunks[1], chunks[0], *chunks[2:]])
    mismatch = first_mismatch(swapped, n)
    assert mismatch is not None and mismatch < 8  # caught in the first stamp
    assert first_mismatch(data[:-1], n) == n - 1
    assert first_mismatch(data + b"x", n) == n


async def test_head_gets_headers_only(direct: httpx.AsyncClient) -> None:
    r = await direct.head("/bytes/5000")
    assert r.headers["content-length"] == "5000"
    assert r.content == b""


async def test_sha256_streams_request_body(direct: httpx.AsyncClient, upstream: Upstream) -> None:
    n = 3 * 1024 * 1024 + 5

    async def body() -> AsyncIterator[bytes]:
        for chunk in iter_payload(n):
            yield chunk

    r = await direct.post("/sha256", content=body())  # chunked request body
    assert r.json() == {"sha256": payload_sha256(n), "length": n}
    r = await direct.put("/sha256", content=b"abc")
    assert r.json() == {"sha256": hashlib.sha256(b"abc").hexdigest(), "length": 3}


async def test_echo_keeps_header_order_case_and_duplicates(direct: httpx.AsyncClient) -> None:
    headers = [("X-Mixed-Case", "One"), ("x-dup", "a"), ("X-Dup", "b"), ("X-Latin", "caf\xe9")]
    r = await direct.request(
        "DELETE",
        "/echo/some/path?q=1&q=2",
        headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        content=b"body!",
    )
    echo = r.json()
    assert echo["method"] == "DELETE"
    assert echo["target"] == "/echo/some/path?q=1&q=2"
    assert echo["http_version"] == "1.1"
    sent = [(name, value) for name, value in echo["headers"] if name.lower().startswith("x-")]
    assert sent == headers
    assert echo["body_length"] == 5
    assert echo["body_sha256"] == hashlib.sha256(b"body!").hexdigest()


async def test_keep_alive_reuses_the_connection(direct: httpx.AsyncClient, upstream: Upstream) -> None:
    first = (await direct.get("/echo")).json()
    second = (await direct.post("/echo", content=b"x")).json()
    assert first["connection"] == second["connection"]
    assert second["request_number"] == first["request_number"] + 1
    assert upstream.state.connections == 1


async def test_slow_streams_chunks_in_order(direct: httpx.AsyncClient) -> None:
    async with direct.stream("GET", "/slow?chunks=4&interval=0.05") as r:
        assert r.headers["transfer-encoding"] == "chunked"
        body = b"".join([chunk async for chunk in r.aiter_raw()])
    assert body == b"chunk 0\nchunk 1\nchunk 2\nchunk 3\n"


async def test_hold_streams_first_chunk_before_release(direct: httpx.AsyncClient, upstream: Upstream) -> None:
    async with direct.stream("GET", "/hold/k1") as r:
        chunks = r.aiter_raw()
        assert await chunks.__anext__() == b"held\n"  # arrived while the response is still open
        async with http_client(upstream.url) as other:
            assert (await other.post("/release/k1")).json() == {"released": "k1"}
        rest = b"".join([chunk async for chunk in chunks])
    assert rest == b"released\n"
    upstream.state.release("k2")  # released before it is requested: does not wait at all
    assert (await direct.get("/hold/k2")).content == b"held\nreleased\n"


async def test_sse_events(direct: httpx.AsyncClient) -> None:
    r = await direct.get("/sse?n=3&interval=0.01")
    assert r.headers["content-type"] == "text/event-stream"
    assert r.text == "".join(f"id: {i}\ndata: event {i}\n\n" for i in range(3))


async def test_sleep_answers_after_waiting(direct: httpx.AsyncClient) -> None:
    r = await direct.get("/sleep?s=0.05")
    assert r.text == "slept\n"
    with trio.move_on_after(0.2) as scope:
        await direct.get("/sleep?s=30")
    assert scope.cancelled_caught


async def test_counters(direct: httpx.AsyncClient, upstream: Upstream) -> None:
    assert (await direct.post("/count/a")).json() == {"key": "a", "count": 1}
    assert (await direct.post("/count/a")).json() == {"key": "a", "count": 2}
    assert (await direct.post("/count/b")).json() == {"key": "b", "count": 1}
    assert (await direct.get("/counts")).json() == {"a": 2, "b": 1}
    assert upstream.counts == {"a": 2, "b": 1}


async def test_paths_records_every_target(direct: httpx.AsyncClient, upstream: Upstream) -> None:
    await direct.get("/one?x=1")
    await direct.post("/echo/two")
    assert (await direct.get("/paths")).json() == ["/one?x=1", "/echo/two", "/paths"]
    assert upstream.paths == ["/one?x=1", "/echo/two", "/paths"]


async def test_fallback_echoes_target(direct: httpx.AsyncClient) -> None:
    r = await direct.get("/anything/else?y=2")
    assert r.status_code == 200
    assert r.text == "/anything/else?y=2"


@pytest.mark.parametrize("status", [201, 204, 304, 404, 500, 503])
async def test_status(direct: httpx.AsyncClient, status: int) -> None:
    r = await direct.get(f"/status/{status}")
    assert r.status_code == status
    assert r.content == (b"" if status in (204, 304) else f"status {status}\n".encode())


async def test_abort_resets_without_or_during_response(direct: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.TransportError):
        await direct.get("/abort")
    with pytest.raises(httpx.TransportError):
        await direct.get("/abort?after=1000")


async def test_expect_100_continue_and_bad_request(upstream: Upstream) -> None:
    """Raw h11 client: a 100 comes before the body is read; garbage gets a 400 and a close."""
    stream = await trio.open_tcp_stream("127.0.0.1", upstream.port)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="POST",
        target="/sha256",
        headers=[("Host", "x"), ("Content-Length", "3"), ("Expect", "100-continue")],
    )
    await stream.send_all(conn.send(request))
    events: list[h11.Event] = []
    with trio.fail_after(15):
        while not events:
            conn.receive_data(await stream.receive_some(65536))
            while (event := conn.next_event()) is not h11.NEED_DATA:
                events.append(event)  # type: ignore[arg-type]
        assert isinstance(events[0], h11.InformationalResponse) and events[0].status_code == 100
        await stream.send_all(conn.send(h11.Data(data=b"abc")) + conn.send(h11.EndOfMessage()))
        body = b""
        while not isinstance(event, h11.EndOfMessage):
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                body += event.data
    assert json.loads(body)["sha256"] == hashlib.sha256(b"abc").hexdigest()
    await stream.aclose()

    stream = await trio.open_tcp_stream("127.0.0.1", upstream.port)
    await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
    with trio.fail_after(15):
        reply = b""
        while data := await stream.receive_some(65536):
            reply += data
    assert reply.startswith(b"HTTP/1.1 400 ")
    await stream.aclose()


async def test_subprocess_mode_ready_paths_and_clean_sigterm() -> None:
    with reserved_port() as port:
        async with run_upstream_process(port) as proc:
            assert proc.port == port
            async with http_client(proc.url) as c:
                assert (await c.get(f"/bytes/{100}")).content == payload(100)
                assert (await c.get("/paths")).json() == ["/bytes/100", "/paths"]
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait_exit() == 0
        async with run_upstream_process(port) as again:  # restart on the same port
            assert again.port == port
            async with http_client(again.url) as c:
                assert (await c.get("/paths")).json() == ["/paths"]  # fresh state


async def test_big_download_streams(direct: httpx.AsyncClient) -> None:
    n = 32 * 1024 * 1024 + 3
    digest = hashlib.sha256()
    got = 0
    async with direct.stream("GET", f"/bytes/{n}") as r:
        async for chunk in r.aiter_bytes():
            digest.update(chunk)
            got += len(chunk)
    assert got == n
    assert digest.hexdigest() == payload_sha256(n)
