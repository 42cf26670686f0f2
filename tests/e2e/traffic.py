"""Mixed traffic through a whole tunnel, every response checked: the leak test's burst and bench/soak.py's load.

    async with open_stack(token) as stack:       # upstreams, relay, fault proxy, two agents, admin endpoints
        checker = Checker()
        await burst(stack, checker)              # one of every kind of exchange, aborted ones included
        stack.proxy.cut()                        # the agents' links die; they reconnect
        snapshot = await stack.snapshot()        # streams, tasks, fds, RSS of the relay and both agents

The relay serves two named tunnels: `ws` (prefix /ws) to tests/e2e/wsupstream.py for WebSocket sessions, and
a catch-all to tests/e2e/upstream.py for everything else, whose agent allows GET and POST only (DELETE is the
denied request). Both agents dial the relay through tests/faultproxy.py.
"""

# ASYNC109: every wait has a built-in fail_after, so a broken product fails instead of hanging.
# ruff: noqa: ASYNC109

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import httpx
import trio
import trio_websocket

from ..faultproxy import FaultProxy, open_fault_proxy
from .procs import Agent, ManagedProcess, Relay, http_client, run_agent, run_relay
from .upstream import Upstream, open_upstream, payload_sha256
from .wsupstream import WsUpstream, open_ws_upstream

__all__ = ["KINDS", "Checker", "Snapshot", "Stack", "burst", "open_stack", "run_kind"]

KiB, MiB = 1024, 1024 * 1024
ADMIN_LINE = "admin listening on "
LINK_ARGS = ["--ping-interval", "1", "--dead-timeout", "5"]
AGENT_ARGS = [*LINK_ARGS, "--backoff-initial", "0.1", "--backoff-cap", "0.5", "--connect-timeout", "2"]
SIZES = {"small": 2 * KiB, "bulk": 4 * MiB}


@dataclasses.dataclass
class Snapshot:
    """One admin sample per process: name -> its /status.json "process" block plus streams_open."""

    processes: dict[str, dict[str, int]]

    def get(self, name: str, key: str) -> int:
        return self.processes[name][key]


@dataclasses.dataclass
class Stack:
    relay: Relay
    agents: dict[str, Agent]
    proxy: FaultProxy
    upstream: Upstream
    ws: WsUpstream
    admins: dict[str, str]  # process name -> admin base URL
    http: httpx.AsyncClient  # to the relay's HTTP listener, keep-alive

    @property
    def http_port(self) -> int:
        return self.relay.http_port

    async def snapshot(self) -> Snapshot:
        processes: dict[str, dict[str, int]] = {}
        # A new connection each time (Connection: close), so the sample never counts a pooled one of ours.
        async with http_client(headers={"Connection": "close"}) as admin:
            for name, url in self.admins.items():
                status = (await admin.get(f"{url}/status.json")).json()
                process = {k: int(v or 0) for k, v in status["process"].items()}
                process["streams_open"] = int(status["streams_open"])
                process["links"] = len(status.get("agents") or status.get("relays") or [])
                processes[name] = process
        return Snapshot(processes)

    async def wait_links(self, agents: int, *, timeout: float = 30) -> None:
        """Until the relay has `agents` agent links up (after a cut, the agents reconnect)."""
        with trio.fail_after(timeout):
            while (await self.snapshot()).get("relay", "links") != agents:  # noqa: ASYNC110  (a poll)
                await trio.sleep(0.1)


async def _admin_url(proc: ManagedProcess) -> str:
    line = await proc.wait_for_line(ADMIN_LINE)
    return line.string.split(ADMIN_LINE, 1)[1].split()[0]


@asynccontextmanager
async def open_stack(
    token: str, *, relay_args: Sequence[str] = (), agent_args: Sequence[str] = ()
) -> AsyncIterator[Stack]:
    admin = ["--admin", "127.0.0.1:0"]
    tunnels = ["--tunnel", "main=", "--tunnel", "ws=prefix:/ws,keep-prefix"]
    async with (
        open_upstream() as upstream,
        open_ws_upstream() as ws,
        run_relay(
            token, extra_args=[*admin, *tunnels, *LINK_ARGS, "--agent-wait", "15", *relay_args]
        ) as relay,
        open_fault_proxy("127.0.0.1", relay.agents_port) as proxy,
    ):
        url = f"ws://127.0.0.1:{proxy.port}"
        common = [*admin, *AGENT_ARGS, *agent_args]
        async with (
            run_agent(
                url,
                upstream.url,
                token=token,
                allow=["GET /**", "POST /**"],
                extra_args=["--tunnel", "main", *common],
            ) as main_agent,
            run_agent(
                url, f"http://127.0.0.1:{ws.port}", token=token, extra_args=["--tunnel", "ws", *common]
            ) as ws_agent,
            http_client(relay.http_url) as client,
        ):
            admins = {
                "relay": await _admin_url(relay),
                "agent": await _admin_url(main_agent),
                "ws agent": await _admin_url(ws_agent),
            }
            stack = Stack(
                relay, {"agent": main_agent, "ws agent": ws_agent}, proxy, upstream, ws, admins, client
            )
            await stack.wait_links(2)
            yield stack


class Checker:
    """Counts every exchange by kind and outcome. A `wrong` one (unexpected status, bad body) fails a run;
    a `failed` one (error status or broken connection) is excused only when a link cut overlapped it."""

    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.wrong: list[str] = []
        self.failed: list[tuple[str, float, float, str]] = []  # kind, started, ended, why
        self.cuts: list[float] = []

    def excused(self, started: float, ended: float) -> bool:
        return any(started - 1 <= cut <= ended + 1 for cut in self.cuts)

    def unexcused_failures(self) -> list[str]:
        return [f"{kind}: {why}" for kind, s, e, why in self.failed if not self.excused(s, e)]

    @property
    def total(self) -> int:
        return sum(self.ok.values()) + len(self.wrong) + len(self.failed)


class _Wrong(Exception):
    """The response is not what the upstream sent: a correctness failure, never excused."""


class _Failed(Exception):
    """An error status or a broken connection: excused when a link cut overlapped the exchange."""


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        kind = _Failed if response.status_code in (502, 503, 504) else _Wrong
        raise kind(f"status {response.status_code}, expected {status}: {response.text[:200]!r}")


async def _small(stack: Stack) -> None:
    n = SIZES["small"]
    response = await stack.http.get(f"/bytes/{n}")
    _expect(response, 200)
    if hashlib.sha256(response.content).hexdigest() != payload_sha256(n):
        raise _Wrong(f"small download: wrong body ({len(response.content)} bytes)")


async def _bulk_down(stack: Stack) -> None:
    n = SIZES["bulk"]
    digest, size = hashlib.sha256(), 0
    async with stack.http.stream("GET", f"/bytes/{n}") as response:
        _expect(response, 200)
        async for chunk in response.aiter_bytes():
            digest.update(chunk)
            size += len(chunk)
    if digest.hexdigest() != payload_sha256(n):
        raise _Wrong(f"bulk download: wrong body ({size} bytes)")


async def _bulk_up(stack: Stack) -> None:
    body = os.urandom(SIZES["bulk"])
    response = await stack.http.post("/sha256", content=body)
    _expect(response, 200)
    answer = response.json()
    if answer != {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}:
        raise _Wrong(f"bulk upload: the upstream saw {answer}")


async def _sse(stack: Stack) -> None:
    expected = "".join(f"id: {i}\ndata: event {i}\n\n" for i in range(5))
    async with stack.http.stream("GET", "/sse?n=5&interval=0.05") as response:
        _expect(response, 200)
        text = "".join([chunk async for chunk in response.aiter_text()])
    if hashlib.sha256(text.encode()).digest() != hashlib.sha256(expected.encode()).digest():
        raise _Wrong(f"SSE stream: got {text[:200]!r}")


async def _websocket(stack: Stack) -> None:
    url = f"ws://127.0.0.1:{stack.http_port}/ws/echo"
    try:
        async with trio_websocket.open_websocket_url(url, connect_timeout=20, disconnect_timeout=5) as ws:
            for i in range(5):
                message = os.urandom(1000 + i * 5000)
                await ws.send_message(message)
                echoed = await ws.get_message()
                if hashlib.sha256(echoed if isinstance(echoed, bytes) else echoed.encode()).digest() != (
                    hashlib.sha256(message).digest()
                ):
                    raise _Wrong("WebSocket: the echo differs from the message")
    except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError) as exc:
        raise _Failed(f"WebSocket: {exc!r}"[:200]) from None


async def _raw(stack: Stack, head: bytes, body: bytes, read: int) -> None:
    """Send a head and part of a body, read part of the answer, then leave: an abandoned exchange."""
    async with await trio.open_tcp_stream("127.0.0.1", stack.http_port) as stream:
        await stream.send_all(head + body)
        got = 0
        with trio.move_on_after(10):
            while got < read:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                got += len(chunk)


async def _aborted_upload(stack: Stack) -> None:
    head = b"POST /sha256 HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (4 * MiB)
    await _raw(stack, head, os.urandom(256 * KiB), 0)


async def _aborted_download(stack: Stack) -> None:
    await _raw(stack, b"GET /bytes/%d HTTP/1.1\r\nHost: a\r\n\r\n" % (64 * MiB), b"", 256 * KiB)


_DENIED: dict[str, str] = {}  # the SHA-256 of the first refusal's body: every later one must be the same


async def _denied(stack: Stack) -> None:
    response = await stack.http.delete("/private")
    _expect(response, 403)
    digest = hashlib.sha256(response.content).hexdigest()
    if _DENIED.setdefault("body", digest) != digest:
        raise _Wrong(f"denied request: a different refusal body {response.text[:200]!r}")


KINDS: dict[str, Callable[[Stack], Awaitable[None]]] = {
    "small": _small,
    "bulk down": _bulk_down,
    "bulk up": _bulk_up,
    "sse": _sse,
    "websocket": _websocket,
    "aborted upload": _aborted_upload,
    "aborted download": _aborted_download,
    "denied": _denied,
}


async def run_kind(stack: Stack, checker: Checker, kind: str) -> None:
    started = trio.current_time()
    try:
        with trio.fail_after(60):
            await KINDS[kind](stack)
    except _Wrong as exc:
        checker.wrong.append(f"{kind}: {exc}")
    except (_Failed, httpx.TransportError, trio.TooSlowError) as exc:
        checker.failed.append((kind, started, trio.current_time(), repr(exc)[:200]))
    else:
        checker.ok[kind] += 1


async def burst(stack: Stack, checker: Checker, *, small: int = 10) -> None:
    """One exchange of every kind (and `small` small ones), all at once."""
    async with trio.open_nursery() as nursery:
        for kind in KINDS:
            for _ in range(small if kind == "small" else 1):
                nursery.start_soon(run_kind, stack, checker, kind)
