"""`dial --app` with ASGI 3 apps (raw and Starlette), relay and agent in-process through the library API."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import trio_websocket
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import rtunnel
from rtunnel.agent.apps.lifespan import StartupError

from ...app_rig import open_tunnel

Scope = dict[str, Any]


async def test_starlette_get_post_and_the_scope_behind_a_proxy() -> None:
    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        scope = request.scope
        return JSONResponse(
            {
                "method": request.method,
                "path": scope["path"],
                "raw_path": scope["raw_path"].decode(),
                "query": scope["query_string"].decode(),
                "root_path": scope["root_path"],
                "scheme": scope["scheme"],
                "client": scope["client"][0],
                "server": list(scope["server"]),
                "body": len(body),
                "request_id": request.headers.get("x-request-id"),
            }
        )

    app = Starlette(routes=[Route("/{rest:path}", echo, methods=["GET", "POST"])])
    async with open_tunnel(app, serve_options={"tunnel": ["api=prefix:/api"]}, tunnel="api") as tunnel:
        get = await tunnel.client.get("/api/a%20b?x=1", headers={"X-Request-Id": "r-1"})
        post = await tunnel.client.post("/api/up", content=b"z" * 300_000)
        port = tunnel.where.http[1]
    assert get.json() == {
        "method": "GET",
        "path": "/a b",
        "raw_path": "/a%20b",
        "query": "x=1",
        "root_path": "/api",
        "scheme": "http",
        "client": "127.0.0.1",
        "server": ["127.0.0.1", port],
        "body": 0,
        "request_id": "r-1",
    }
    assert post.json()["body"] == 300_000


async def test_sse_goes_out_event_by_event() -> None:
    step = trio.Event()

    async def events(request: Request) -> StreamingResponse:
        async def stream() -> Any:
            yield "data: one\n\n"
            await step.wait()  # the second event exists only once the client has the first
            yield "data: two\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/events", events)])
    async with open_tunnel(app) as tunnel, tunnel.client.stream("GET", "/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = response.aiter_raw()
        assert await anext(chunks) == b"data: one\n\n"
        step.set()
        assert await anext(chunks) == b"data: two\n\n"


async def test_the_app_sees_http_disconnect_when_the_client_leaves() -> None:
    seen: list[str] = []
    done = trio.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        assert (await receive())["type"] == "http.request"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        seen.append((await receive())["type"])  # waits until the client is gone
        try:
            await send({"type": "http.response.body", "body": b"more", "more_body": True})
        except OSError:
            seen.append("send raised OSError")
        done.set()

    async with open_tunnel(app) as tunnel:
        async with tunnel.client.stream("GET", "/") as response:
            await anext(response.aiter_raw())
        with trio.fail_after(10):
            await done.wait()
    assert seen == ["http.disconnect", "send raised OSError"]


async def test_trailers_reach_the_client() -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        assert "http.response.trailers" in scope["extensions"]
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"payload"})
        await send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")]})

    async with open_tunnel(app) as tunnel:
        host, port = tunnel.where.http
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n")
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                received += chunk
        await stream.aclose()
    assert received.startswith(b"HTTP/1.1 200")
    assert b"payload" in received
    assert received.endswith(b"0\r\ngrpc-status: 0\r\n\r\n")


async def test_app_errors_500_cut_or_504_and_other_exchanges_unharmed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/raise":
            raise LookupError("before the head")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if path == "/hang":
            await trio.sleep_forever()
        if path == "/cut":
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            raise LookupError("mid-body")
        if path == "/silent":
            return
        await send({"type": "http.response.body", "body": b"fine"})

    async def forgetful(scope: Scope, receive: Any, send: Any) -> None:
        return

    # The default --response-timeout: /ok must get its 200 however loaded the machine. (/silent shows a 500
    # at once, as the app returned after its head; a head timer left running past it would give a 504.)
    async with open_tunnel(app) as tunnel:
        client = tunnel.client
        assert (await client.get("/raise")).status_code == 500
        assert (await client.get("/ok")).text == "fine"
        # A head announced in time but never followed by a body: the client sees the 500 of an app that
        # stopped mid-response, not a 504.
        assert (await client.get("/silent")).status_code == 500
        # Cut: the relay may have written the head or not yet when the RESET arrives, never a complete body.
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("GET", "/cut") as response:
                await response.aread()
    raised = [r for r in caplog.records if r.exc_info and r.exc_info[0] is LookupError]
    assert len(raised) == 2

    async def hangs(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await trio.sleep_forever()

    async with open_tunnel(hangs, response_timeout=0.3) as tunnel:
        timed_out = await tunnel.client.get("/")
    assert timed_out.status_code == 504

    async with open_tunnel(forgetful, lifespan="off") as tunnel:
        assert (await tunnel.client.get("/")).status_code == 500


async def test_lifespan_startup_runs_before_the_agent_dials_and_shares_state() -> None:
    order: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            await trio.sleep(0.05)  # a slow start-up: the agent must still wait for it
            scope["state"]["db"] = "ready"
            order.append("startup")
            await send({"type": "lifespan.startup.complete"})
            assert (await receive())["type"] == "lifespan.shutdown"
            order.append("shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return
        order.append(f"request db={scope['state'].get('db')}")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body"})

    async with open_tunnel(app, lifespan="on") as tunnel:
        order.append("connected")
        assert (await tunnel.client.get("/")).status_code == 204
    assert order == ["startup", "connected", "request db=ready", "shutdown"]


async def test_failed_startup_and_asyncio_apps_stop_dial_with_one_line() -> None:
    async def fails(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    async def needs_asyncio(scope: Scope, receive: Any, send: Any) -> None:
        asyncio.get_running_loop()

    for app, expected in ((fails, "start-up failed: no database"), (needs_asyncio, "the app needs asyncio")):
        with pytest.RaisesGroup(pytest.RaisesExc(StartupError, match=expected), flatten_subgroups=True):
            await rtunnel.dial(["ws://127.0.0.1:9"], app=app, token="x")


async def test_websocket_echo_through_the_tunnel() -> None:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol="echo.v1")
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "bye":
                await websocket.close(code=4000)
                return
            if message.get("text") is not None:
                await websocket.send_text("echo " + message["text"])
            else:
                await websocket.send_bytes(message["bytes"][::-1])

    async def refuse(websocket: WebSocket) -> None:
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", echo), WebSocketRoute("/no", refuse)])
    async with open_tunnel(app) as tunnel:
        host, port = tunnel.where.http
        with trio.fail_after(20):
            async with trio_websocket.open_websocket_url(
                f"ws://{host}:{port}/ws", subprotocols=["echo.v1"]
            ) as ws:
                assert ws.subprotocol == "echo.v1"
                await ws.send_message("hello")
                assert await ws.get_message() == "echo hello"
                big = bytes(range(256)) * 2000  # several tunnel frames and window updates
                await ws.send_message(big)
                assert await ws.get_message() == big[::-1]
                await ws.send_message("bye")
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 4000
            with pytest.raises(trio_websocket.HandshakeError):
                async with trio_websocket.open_websocket_url(f"ws://{host}:{port}/no"):
                    pass


async def test_max_streams_bounds_the_exchanges_the_app_runs_at_once() -> None:
    running: list[str] = []
    most = 0
    release, first = trio.Event(), trio.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        nonlocal most
        if scope["type"] != "http":
            return
        running.append(scope["path"])
        most = max(most, len(running))
        first.set()
        await release.wait()
        running.remove(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    async with open_tunnel(app, max_streams=1) as tunnel:
        results: list[int] = []

        async def get(path: str) -> None:
            results.append((await tunnel.client.get(path)).status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, "/a")
            nursery.start_soon(get, "/b")
            await first.wait()
            # Every task blocked (all in this process): the second request went as far as it could, and the
            # relay holds it back.
            await trio.testing.wait_all_tasks_blocked()
            assert len(running) == 1
            release.set()
    assert results == [200, 200]
    assert most == 1
