"""`rtunnel dial`: keep one WebSocket to each relay and serve the streams it carries to the upstream.

Each relay URL gets its own reconnect loop: exponential backoff with full jitter between failed attempts, reset
once a connection has stayed up for `healthy_after` seconds, unlimited retries. Every failed attempt is logged
with its reason and the delay before the next one. `drain()` (SIGTERM) sends GOAWAY on every connection and
stops reconnecting; the relay closes each connection once its exchanges are done (or the grace period ends).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from protocol import RemoteProtocolError, Role, Settings

from ..link import transport
from ..link.mux import LinkDead, Multiplexer, MuxStream, TransportLike, close_code
from ..ops.metrics import Metrics
from .backoff import Backoff

log = logging.getLogger("rtunnel.agent")

# After a 401 the token will not fix itself: retry, but slowly, so a misconfigured fleet does not hammer the relay.
AUTH_RETRY_DELAY = 60.0
# After the grace period, how long closing the connections may take before they are cut.
CLOSE_TIMEOUT = 5.0


class Link(TransportLike, Protocol):
    def abort(self) -> None: ...

    async def aclose(self, code: int = ..., reason: str = ...) -> None: ...


class Connector(Protocol):
    """How the agent dials a relay: `transport.connect`, or a fake in tests."""

    def __call__(
        self, url: str, *, token: str | None, ssl_context: ssl.SSLContext | None, connect_timeout: float
    ) -> contextlib.AbstractAsyncContextManager[Link]: ...


@dataclasses.dataclass
class AgentConfig:
    relay_urls: Sequence[str]
    token: str | None = None
    ssl_context: ssl.SSLContext | None = None
    backoff_initial: float = 0.5
    backoff_cap: float = 30.0
    healthy_after: float = 10.0  # a connection up this long resets the backoff
    ping_interval: float = 5.0
    dead_timeout: float = 20.0
    connect_timeout: float = 10.0
    settings: Settings = dataclasses.field(default_factory=lambda: Settings(max_concurrent_streams=10_000))
    tunnel: str | None = None  # the relay's named tunnel it serves (sent by the connector; here for metrics)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        handler: Callable[[MuxStream], Awaitable[None]],
        *,
        connect: Connector = transport.connect,
    ) -> None:
        self.config = config
        self._handler = handler
        self._connect = connect
        self.connections: dict[str, Multiplexer] = {}
        self.metrics = Metrics("agent")
        self._draining = False
        self._stop = trio.Event()  # set by drain(): wakes loops sleeping between attempts
        self._finished = trio.Event()  # every reconnect loop has returned
        self._connected = trio.Event()  # a first link came up

    async def run(self) -> None:
        """Keep a connection to every relay until cancelled, or until drain() let them all close."""
        try:
            async with trio.open_nursery() as nursery:
                for url in self.config.relay_urls:
                    nursery.start_soon(self._keep_connected, url)
        finally:
            self._finished.set()

    async def drain(self, grace: float) -> None:
        """Graceful stop: GOAWAY everywhere, no reconnect, up to `grace` s for exchanges in progress.

        Each relay closes its connection once the exchanges on it are done (so it has seen the GOAWAY, and
        retries any request it sent meanwhile elsewhere); connections still open after `grace` are cut.
        """
        self._draining = True
        self._stop.set()
        for mux in list(self.connections.values()):
            mux.goaway()
        with trio.move_on_after(grace):
            await self._finished.wait()
        if self._finished.is_set():
            return
        in_flight = sum(mux.in_flight for mux in self.connections.values())
        log.warning("grace period of %g s over: cutting %d exchanges still in progress", grace, in_flight)
        for mux in list(self.connections.values()):
            mux.abort("grace period over")
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._finished.wait()

    async def _keep_connected(self, url: str) -> None:
        config = self.config
        backoff = Backoff(config.backoff_initial, config.backoff_cap)
        failures = 0
        first_attempt = True
        while not self._draining:
            if not first_attempt:
                self.metrics.reconnects.inc()
            first_attempt = False
            connected_at: list[float] = []
            slow = False
            try:
                why = await self._connect_once(url, connected_at)
            except transport.AuthRejected as exc:
                why, slow = str(exc), True
            except transport.ConnectError as exc:
                why = str(exc)  # says what failed: refused, TLS, timed out (and in which phase), HTTP status
            except transport.TransportClosed as exc:
                why = f"relay {url}: connection lost while closing: {exc}"
            except Exception as exc:
                # A bug must not stop the agent for good: log it in full, then keep trying like any failure.
                log.exception("relay %s: unexpected error", url)
                why = f"relay {url}: unexpected error: {exc!r}"
            if self._draining:
                log.info("%s; draining, not reconnecting", why)
                return
            if connected_at and trio.current_time() - connected_at[0] >= config.healthy_after:
                backoff.reset()
                failures = 0
            failures += 1
            delay = backoff.next_delay()
            if slow:
                delay = max(delay, AUTH_RETRY_DELAY)
                log.error("%s; next attempt in %.1f s (token errors are retried slowly)", why, delay)
            else:
                log.warning("%s; next attempt in %.1f s (%s)", why, delay, _ordinal(failures))
            with trio.move_on_after(delay):
                await self._stop.wait()

    async def _connect_once(self, url: str, connected_at: list[float]) -> str:
        """One connection's life; returns why it ended (raises ConnectError when it never started).

        Appends the time the link came up to `connected_at` (for the backoff reset)."""
        config = self.config
        async with self._connect(
            url,
            token=config.token,
            ssl_context=config.ssl_context,
            connect_timeout=config.connect_timeout,
        ) as link:
            mux = Multiplexer(
                link,
                Role.DIALER,
                handler=self._handler,
                settings=config.settings,
                ping_interval=config.ping_interval,
                dead_timeout=config.dead_timeout,
                name=f"relay {url}",
            )
            why = f"relay {url}: the relay closed the connection"
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(mux.run)
                    connected_at.append(trio.current_time())
                    self.connections[url] = mux
                    self.metrics.link_up(mux, url, tunnel=config.tunnel)
                    log.info("connected to %s", url)
                    self._connected.set()
                    if self._draining:  # drain() began while we were connecting
                        mux.goaway()
            except* (LinkDead, RemoteProtocolError, transport.TransportClosed) as group:
                detail = str(group.exceptions[0])
                if not detail.startswith("connection lost"):  # the transport's reasons often say it already
                    detail = f"connection lost: {detail}"
                why = f"relay {url}: {detail}"
                error = group.exceptions[0]
                if isinstance(error, RemoteProtocolError):
                    await link.aclose(close_code(error))  # behind the GOAWAY (SPEC 10)
                link.abort()  # a dead link would make a graceful close wait for a Close that never comes
            finally:
                self.connections.pop(url, None)
                self.metrics.link_down(mux)
            if self._draining:
                # Cut after the grace period, or never drained by the relay: going away (SPEC 10.2). A no-op
                # once the relay closed the connection itself.
                await link.aclose(transport.CLOSE_GOING_AWAY, "agent shutting down")
            return why

    async def wait_connected(self) -> None:
        """Return once a first connection to a relay is up (what `nursery.start(rtunnel.dial)` waits for)."""
        await self._connected.wait()


def _ordinal(failures: int) -> str:
    return "first failure" if failures == 1 else f"{failures} failures in a row"
