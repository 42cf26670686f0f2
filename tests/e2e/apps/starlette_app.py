"""A Starlette (ASGI) app for tests/e2e/test_apps.py, run by `rtunnel dial --app starlette_app:app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

log = logging.getLogger("testapp")
BLOCK = bytes(range(256)) * 256  # 64 KiB
gate = anyio.Event()


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await anyio.sleep(0.3)  # a slow start-up: no request may arrive before it is done
    log.warning("testapp: startup complete")
    yield
    log.warning("testapp: shutdown")


async def hello(request: Request) -> Response:
    return JSONResponse({"hello": "starlette", "client": request.client.host if request.client else None})


async def download(request: Request) -> Response:
    async def generate() -> AsyncIterator[bytes]:
        for _ in range(int(request.path_params["blocks"])):
            yield BLOCK

    return StreamingResponse(generate(), media_type="application/octet-stream")


async def events(request: Request) -> Response:
    async def generate() -> AsyncIterator[str]:
        yield "data: one\n\n"
        await gate.wait()  # the second event exists only after /release: nothing can be buffered
        yield "data: two\n\n"

    return StreamingResponse(generate(), media_type="text/event-stream")


async def release(request: Request) -> Response:
    gate.set()
    return PlainTextResponse("released")


async def slow(request: Request) -> Response:
    log.warning("testapp: slow started")
    await anyio.sleep(1.0)
    return PlainTextResponse("slow done")


async def forever(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Raw ASGI: stream until the client goes away, then say so."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    async with anyio.create_task_group() as tasks:

        async def stream() -> None:
            while True:
                await send({"type": "http.response.body", "body": BLOCK, "more_body": True})

        tasks.start_soon(stream)
        while (await receive())["type"] != "http.disconnect":
            pass
        log.warning("testapp: client disconnected")
        tasks.cancel_scope.cancel()


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"echo {text}")
    except WebSocketDisconnect:
        pass


app = Starlette(
    routes=[
        Route("/hello", hello),
        Route("/download/{blocks:int}", download),
        Route("/events", events),
        Route("/release", release),
        Route("/slow", slow),
        Mount("/forever", app=forever),
        WebSocketRoute("/ws", echo),
    ],
    lifespan=lifespan,
)
