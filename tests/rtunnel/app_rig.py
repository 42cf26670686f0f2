"""A relay and an agent serving an app in the test's own trio run, through nothing but the library API."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import trio

import rtunnel

TOKEN = "tok-app-tests"


@dataclasses.dataclass
class Tunnel:
    client: httpx.AsyncClient
    where: rtunnel.Listening
    agent_scope: trio.CancelScope


@asynccontextmanager
async def open_tunnel(
    app: Any, *, serve_options: dict[str, Any] | None = None, **dial_options: Any
) -> AsyncIterator[Tunnel]:
    """`rtunnel.serve` and `rtunnel.dial(app=app)` on ports the OS picks, and an httpx client of the relay."""
    async with trio.open_nursery() as nursery:
        where = await nursery.start(
            partial(
                rtunnel.serve, http="127.0.0.1:0", agents="127.0.0.1:0", token=TOKEN, **(serve_options or {})
            )
        )
        agent_scope = trio.CancelScope()

        async def agent(*, task_status: trio.TaskStatus[None]) -> None:
            with agent_scope:
                await rtunnel.dial(
                    [where.agents_url], app=app, token=TOKEN, task_status=task_status, **dial_options
                )

        await nursery.start(agent)
        async with httpx.AsyncClient(base_url=where.http_url, timeout=10) as client:
            yield Tunnel(client, where, agent_scope)
        nursery.cancel_scope.cancel()
