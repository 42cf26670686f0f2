"""`dial --app` with WSGI apps (PEP 3333), relay and agent in-process through the library API."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from ...app_rig import open_tunnel

Environ = dict[str, Any]


def echo_environ(environ: Environ, start_response: Any) -> list[bytes]:
    keys = [
        "REQUEST_METHOD",
        "SCRIPT_NAME",
        "PATH_INFO",
        "QUERY_STRING",
        "SERVER_NAME",
        "SERVER_PORT",
        "REMOTE_ADDR",
        "HTTP_HOST",
        "CONTENT_TYPE",
        "CONTENT_LENGTH",
        "HTTP_X_REQUEST_ID",
        "HTTP_X_USER",
        "wsgi.url_scheme",
        "wsgi.input_terminated",
        "wsgi.multithread",
    ]
    body = environ["wsgi.input"].read()
    lines = [f"{key}={environ.get(key)!s}" for key in keys] + [f"body={len(body)}"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return ["\n".join(lines).encode()]


def fields(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


async def test_environ_is_what_a_server_behind_a_proxy_gives() -> None:
    async with open_tunnel(
        echo_environ, serve_options={"tunnel": ["api=prefix:/api"]}, tunnel="api"
    ) as tunnel:
        port = tunnel.where.http[1]
        response = await tunnel.client.post(
            "/api/a%20b/c?x=1&y=%2F",
            content=b"hello",
            headers={
                "Content-Type": "text/x-test",
                "X-Request-Id": "req-42",
                "X-Forwarded-Proto": "https",  # a client's claim: the relay replaces it
                "X_User": "admin",  # would read as HTTP_X_USER: dropped
            },
        )
    assert response.status_code == 200
    env = fields(response.text)
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == "/api"  # the named tunnel's prefix, stripped by the relay
    assert env["PATH_INFO"] == "/a b/c"
    assert env["QUERY_STRING"] == "x=1&y=%2F"
    assert env["HTTP_HOST"] == f"127.0.0.1:{port}"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("127.0.0.1", str(port))
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["wsgi.url_scheme"] == "http"
    assert env["CONTENT_TYPE"] == "text/x-test"
    assert env["CONTENT_LENGTH"] == "5"
    assert env["HTTP_X_REQUEST_ID"] == "req-42"
    assert env["HTTP_X_USER"] == "None"
    assert env["wsgi.input_terminated"] == "True"
    assert env["body"] == "5"


async def test_chunked_upload_streams_through_wsgi_input_line_by_line() -> None:
    seen: list[bytes] = []

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        stream = environ["wsgi.input"]
        seen.extend(iter(stream.readline, b""))
        start_response("200 OK", [])
        return [b"%d lines" % len(seen)]

    async def body() -> Any:
        for i in range(100):
            yield b"line %d\n" % i

    async with open_tunnel(app) as tunnel:
        response = await tunnel.client.post("/", content=body())
    assert response.text == "100 lines"
    assert seen[0] == b"line 0\n" and seen[-1] == b"line 99\n"


async def test_denied_request_never_reaches_the_app() -> None:
    calls: list[str] = []

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        calls.append(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b"ok"]

    async with open_tunnel(app, allow=["GET /public/**"]) as tunnel:
        denied = await tunnel.client.get("/admin")
        allowed = await tunnel.client.get("/public/x")
    assert denied.status_code == 403
    assert allowed.status_code == 200
    assert calls == ["/public/x"]


async def test_app_exception_is_a_500_logged_once_and_harms_no_other_exchange(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/boom":
            raise ZeroDivisionError("boom")
        start_response("200 OK", [])
        return [b"fine"]

    async with open_tunnel(app) as tunnel, trio.open_nursery() as nursery:
        results: dict[str, httpx.Response] = {}

        async def get(path: str) -> None:
            results[path] = await tunnel.client.get(path)

        nursery.start_soon(get, "/boom")
        nursery.start_soon(get, "/ok")
    assert results["/boom"].status_code == 500
    assert results["/ok"].text == "fine"
    raised = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ZeroDivisionError]
    assert len(raised) == 1
    assert "the WSGI app raised" in raised[0].getMessage()


async def test_exception_after_the_head_cuts_the_response() -> None:
    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"partial"
        if environ["PATH_INFO"] == "/cut":
            raise RuntimeError("mid-body")

    async with open_tunnel(app) as tunnel:
        # The relay may have written the head or not yet when the RESET arrives, never a complete body.
        with pytest.raises(httpx.RemoteProtocolError):
            async with tunnel.client.stream("GET", "/cut") as response:
                await response.aread()
        assert (await tunnel.client.get("/")).text == "partial"


async def test_exc_info_replaces_the_head_before_anything_was_sent() -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("X-First", "1")])
        try:
            {}["missing"]
        except KeyError:
            start_response("503 Service Unavailable", [("X-Second", "1")], sys.exc_info())
        return [b"sorry"]

    async with open_tunnel(app) as tunnel:
        response = await tunnel.client.get("/")
    assert response.status_code == 503
    assert "x-first" not in response.headers and response.headers["x-second"] == "1"
    assert response.text == "sorry"


async def test_write_callable_and_a_streaming_iterable_go_out_chunk_by_chunk() -> None:
    step = threading.Event()

    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/event-stream")])
        write(b"data: first\n\n")
        # Only once the client has the first event is the second produced: nothing is held back.
        assert step.wait(10)
        yield b"data: second\n\n"

    async with open_tunnel(app) as tunnel, tunnel.client.stream("GET", "/") as response:
        chunks = response.aiter_raw()
        assert await anext(chunks) == b"data: first\n\n"
        step.set()
        assert await anext(chunks) == b"data: second\n\n"


async def test_client_leaving_mid_stream_closes_the_iterable() -> None:
    closed = threading.Event()

    class Forever:
        def __iter__(self) -> Iterator[bytes]:
            while not closed.is_set():
                yield b"x" * 1000

        def close(self) -> None:
            closed.set()

    def app(environ: Environ, start_response: Any) -> Forever:
        start_response("200 OK", [])
        return Forever()

    async with open_tunnel(app) as tunnel:
        async with tunnel.client.stream("GET", "/") as response:
            await anext(response.aiter_raw())
        await trio.to_thread.run_sync(closed.wait, 10)
    assert closed.is_set()


async def test_app_that_hangs_gets_504_after_response_timeout() -> None:
    release = threading.Event()

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        release.wait(10)
        start_response("200 OK", [])
        return [b"too late"]

    try:
        async with open_tunnel(app, response_timeout=0.3) as tunnel:
            response = await tunnel.client.get("/")
    finally:
        release.set()
    assert response.status_code == 504
    assert "no response within 0.3 s" in response.text


async def test_head_and_content_length_framing(caplog: pytest.LogCaptureFixture) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/short":
            start_response("200 OK", [("Content-Length", "10")])
            return [b"12345"]
        start_response("200 OK", [("Content-Length", "5")])
        return [b"12345"]

    async with open_tunnel(app) as tunnel:
        head = await tunnel.client.head("/")
        short = await tunnel.client.get("/short")
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == "5"
    assert short.status_code == 500  # nothing was sent yet: the app's error is a 500
    assert any("shorter" in r.getMessage() or "ended after 5" in str(r.exc_info) for r in caplog.records)


async def test_wsgi_errors_go_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        environ["wsgi.errors"].write("something odd\n")
        start_response("204 No Content", [])
        return []

    with caplog.at_level(logging.INFO):
        async with open_tunnel(app) as tunnel:
            assert (await tunnel.client.get("/")).status_code == 204
    assert any(r.getMessage() == "wsgi.errors: something odd" for r in caplog.records)
