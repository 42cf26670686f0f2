"""Graceful shutdown as rtunnel's CLI wires it, in-process: /readyz stops inviting traffic the moment draining
starts, and a second SIGTERM / Ctrl-C during the grace period stops at once."""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio
import trio.testing

from rtunnel.cli import commands as cli
from rtunnel.cli.configfile import parse_args
from rtunnel.cli.dial import agent_runner
from rtunnel.cli.serve import relay_runner


def _runner(*argv: str) -> Callable[[], Awaitable[None]]:
    args = parse_args(cli.build_parser(), list(argv))
    return relay_runner(args) if args.command == "serve" else agent_runner(args)


class _LogWatch(logging.Handler):
    """Wakes waiters on every record of the "rtunnel" loggers (emitted in trio's thread: the code under test
    logs from its tasks)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self._changed.set()
        self._changed = trio.Event()

    def find(self, pattern: str) -> re.Match[str] | None:
        return next((m for text in self.messages if (m := re.search(pattern, text))), None)

    async def wait_for(self, pattern: str) -> re.Match[str]:
        with trio.fail_after(10):
            while (match := self.find(pattern)) is None:
                await self._changed.wait()
        return match


@pytest.fixture
def logs() -> Iterator[_LogWatch]:
    watch = _LogWatch()
    logger = logging.getLogger("rtunnel")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


async def _get(port: int, path: str) -> int:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    return int(data.split(b" ", 2)[1])


async def test_readyz_turns_503_as_soon_as_the_relay_starts_draining(
    nursery: trio.Nursery, logs: _LogWatch
) -> None:
    relay = _runner("serve", "--http", "127.0.0.1:0", "--agents", "127.0.0.1:0", "--admin", "127.0.0.1:0")
    nursery.start_soon(relay)
    agents_port = (await logs.wait_for(r"listening http=\S+ agents=127\.0\.0\.1:(\d+)")).group(1)
    admin_port = int((await logs.wait_for(r"admin listening on http://127\.0\.0\.1:(\d+)")).group(1))
    nursery.start_soon(_runner("dial", f"ws://127.0.0.1:{agents_port}", "--upstream", "http://127.0.0.1:9"))
    await logs.wait_for(r"agent connected from")
    assert await _get(admin_port, "/readyz") == 200
    await relay.drain()  # type: ignore[attr-defined]  # no exchange in progress: returns at once
    # The agent is still connected, and the relay still up: only draining can make it not ready.
    assert await _get(admin_port, "/readyz") == 503
    assert await _get(admin_port, "/healthz") == 200


async def test_readyz_turns_503_as_soon_as_the_agent_starts_draining(
    nursery: trio.Nursery, logs: _LogWatch
) -> None:
    # An exchange stays in progress (the upstream never answers), so the link stays up through the drain: only
    # the draining flag can make the agent not ready.
    arrived = trio.Event()

    async def never_answers(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        arrived.set()
        await trio.sleep_forever()

    (upstream,) = await nursery.start(functools.partial(trio.serve_tcp, never_answers, 0, host="127.0.0.1"))
    upstream_port = upstream.socket.getsockname()[1]
    nursery.start_soon(_runner("serve", "--http", "127.0.0.1:0", "--agents", "127.0.0.1:0"))
    ports = (await logs.wait_for(r"listening http=127\.0\.0\.1:(\d+) agents=127\.0\.0\.1:(\d+)")).groups()
    agent = _runner(
        "dial",
        f"ws://127.0.0.1:{ports[1]}",
        "--upstream",
        f"http://127.0.0.1:{upstream_port}",
        "--admin",
        "127.0.0.1:0",
    )
    nursery.start_soon(agent)
    admin_port = int((await logs.wait_for(r"admin listening on http://127\.0\.0\.1:(\d+)")).group(1))
    await logs.wait_for(r"agent connected from")
    assert await _get(admin_port, "/readyz") == 200
    nursery.start_soon(_get, int(ports[0]), "/slow")
    with trio.fail_after(10):
        await arrived.wait()
    nursery.start_soon(agent.drain)  # type: ignore[attr-defined]  # waits out the grace period (30 s)
    assert await _get(admin_port, "/readyz") == 503
    assert logs.find(r"agent \S+ disconnected") is None  # the link is still up


async def test_a_second_signal_during_the_grace_period_stops_at_once(
    autojump_clock: trio.testing.MockClock, logs: _LogWatch
) -> None:
    steps: list[str] = []
    draining = trio.Event()

    async def runner() -> None:
        await trio.sleep_forever()

    async def drain() -> None:
        steps.append("draining")
        draining.set()
        try:
            await trio.sleep(3600)  # a grace period longer than this test allows
        except trio.Cancelled:
            steps.append("cut short")
            raise
        steps.append("grace period over")

    runner.drain = drain  # type: ignore[attr-defined]
    statuses: list[int] = []
    with trio.fail_after(600):  # virtual seconds: fails (does not hang) if the second signal is ignored
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                statuses.append(await cli._until_signal(runner))

            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            os.kill(os.getpid(), signal.SIGTERM)
            await draining.wait()
            os.kill(os.getpid(), signal.SIGINT)  # the operator's Ctrl-C
    assert steps == ["draining", "cut short"]
    assert statuses == [0]
    assert logs.find("received SIGINT again, stopping now") is not None
