"""`rtunnel dial`: keep one WebSocket to each relay and serve the streams it carries to the upstream."""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence

import trio

from protocol import RemoteProtocolError, Role, Settings

from . import transport
from .backoff import Backoff
from .mux import LinkDead, Multiplexer, MuxStream

log = logging.getLogger("rtunnel.agent")

# After a 401 the token will not fix itself: retry, but slowly, so a misconfigured fleet does not hammer the relay.
AUTH_RETRY_DELAY = 60.0


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


class Agent:
    def __init__(self, config: AgentConfig, handler: Callable[[MuxStream], Awaitable[None]]) -> None:
        self.config = config
        self._handler = handler
        self.connections: dict[str, Multiplexer] = {}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for url in self.config.relay_urls:
                nursery.start_soon(self._keep_connected, url)

    async def _keep_connected(self, url: str) -> None:
        config = self.config
        backoff = Backoff(config.backoff_initial, config.backoff_cap)
        while True:
            started = trio.current_time()
            delay: float | None = None
            try:
                why = await self._connect_once(url)
            except transport.AuthRejected as exc:
                log.error("relay %s refused our token: %s", url, exc)
                why = "authentication failed"
                delay = AUTH_RETRY_DELAY
            except transport.ConnectError as exc:
                why = f"cannot connect: {exc}"
            if trio.current_time() - started >= config.healthy_after:
                backoff.reset()
            if delay is None:
                delay = backoff.next_delay()
            log.warning("relay %s: %s; next attempt in %.1f s", url, why, delay)
            await trio.sleep(delay)

    async def _connect_once(self, url: str) -> str:
        """One connection's life; returns why it ended (ConnectError when it never started)."""
        config = self.config
        async with transport.connect(
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
            why = "the relay closed the connection"
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(mux.run)
                    self.connections[url] = mux
                    log.info("connected to %s", url)
            except* (LinkDead, RemoteProtocolError, transport.TransportClosed) as group:
                why = f"connection lost: {group.exceptions[0]}"
                link.abort()  # a dead link would make a graceful close wait for a Close that never comes
            finally:
                self.connections.pop(url, None)
            return why

    def goaway_all(self) -> None:
        for mux in self.connections.values():
            mux.goaway()

    async def wait_idle(self) -> None:
        for mux in list(self.connections.values()):
            await mux.wait_idle()
