"""`rtunnel serve`: accept agents' WebSockets (agents.py) and clients' HTTP (clients.py), and join them stream
by stream through the tunnels' registries (registry.py); the relay's settings, start and graceful stop.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl

import trio

from protocol import Settings

from ..config import TokenGroup
from ..ops.inspector import Inspector
from ..ops.metrics import Metrics
from ..startup import listening
from .agents import Agents
from .clients import Clients
from .limits import HttpLimits
from .registry import Tunnel, TunnelRouter

__all__ = ["FRAME_SIZE", "STREAM_WINDOW", "Relay", "RelayConfig"]

log = logging.getLogger("rtunnel.relay")

# Response bodies flow agent -> relay: a 1 MiB stream window keeps a bulk download from stalling once per
# round trip (256 KiB measured 100-200 MB/s, 4 MiB 220-280), and the 16 MiB connection window still bounds
# what one agent link can make the relay hold.
STREAM_WINDOW = 1024 * 1024
# The largest DATA frame each end accepts (SPEC's default is 16 KiB): a 64 KiB read goes out as one frame, not
# four, which took bulk transfers' tunnel CPU from 6.3 to 5.8 s/GB (down) and 7.6 to 6.9 (up). A small exchange
# behind a bulk one still waits at most one WebSocket message (mux.MAX_MESSAGE), as before.
FRAME_SIZE = 64 * 1024


@dataclasses.dataclass
class RelayConfig:
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    agents_host: str = "127.0.0.1"
    agents_port: int = 8443
    tokens: tuple[bytes, ...] = ()
    # Several tokens, one per agent group (--token-file); `tokens` is shorthand for groups without labels.
    token_groups: tuple[TokenGroup, ...] = ()
    # Failed agent authentications from one address within the window, beyond which it gets 429 (0: off).
    auth_fail_limit: int = 5
    auth_fail_window: float = 60.0
    # A stream whose agent grants no window for this long is reset (None: never).
    stall_timeout: float | None = 60.0
    ssl_context: ssl.SSLContext | None = None
    agent_wait: float = 10.0
    http_limits: HttpLimits = dataclasses.field(default_factory=HttpLimits)
    ping_interval: float = 5.0
    dead_timeout: float = 20.0
    # The relay opens streams and accepts none, so it grants agents no concurrent streams of their own.
    settings: Settings = dataclasses.field(
        default_factory=lambda: Settings(
            max_concurrent_streams=0, initial_stream_window=STREAM_WINDOW, max_frame_size=FRAME_SIZE
        )
    )
    # Named tunnels (none: one unnamed tunnel takes every request, as if tunnels did not exist).
    tunnels: tuple[Tunnel, ...] = ()
    # Connections to the HTTP (agents') listener start with a PROXY protocol header naming the client.
    proxy_protocol: bool = False
    agents_proxy_protocol: bool = False
    # Networks of proxies whose X-Forwarded-For names the client (--trusted-proxy).
    trusted_proxies: tuple[str, ...] = ()


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.router = TunnelRouter(config.agent_wait, config.tunnels)
        self.metrics = Metrics("relay")
        self.agents_address: tuple[str, int] | None = None
        self._agents = Agents(config, self.router, self.metrics)
        self._clients = Clients(config, self.router, self.metrics)

    @property
    def inspector(self) -> Inspector | None:
        """--inspect: every client connection records into it."""
        return self._clients.inspector

    @inspector.setter
    def inspector(self, inspector: Inspector | None) -> None:
        self._clients.inspector = inspector

    @property
    def http_address(self) -> tuple[str, int] | None:
        return self._clients.address

    @property
    def token_groups(self) -> tuple[TokenGroup, ...]:
        return self._agents.token_groups

    @property
    def connection_count(self) -> int:
        """Client connections on the HTTP listener, as counted against --max-connections."""
        return self._clients.connection_count

    def reload_tokens(self, groups: tuple[TokenGroup, ...]) -> None:
        """Replace the accepted tokens (SIGHUP). Agents connected with a token no longer listed are
        disconnected at once; their new attempts get 401."""
        self._agents.reload_tokens(groups)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        async with trio.open_nursery() as nursery:
            with listening("--agents", config.agents_host, config.agents_port):
                self.agents_address = await nursery.start(self._agents.serve)
            # Client handlers run in the outer nursery, so drain() can close the listener alone.
            with listening("--http", config.http_host, config.http_port):
                listeners = await nursery.start(self._clients.serve, nursery)
            sockname = listeners[0].socket.getsockname()
            self._clients.address = (sockname[0], sockname[1])
            scheme = "wss" if config.ssl_context else "ws"
            log.info(
                "listening http=%s:%d agents=%s:%d (%s)%s",
                *self._clients.address,
                *self.agents_address,
                scheme,
                "" if self._agents.all_groups() else " WITHOUT agent authentication (no token set)",
            )
            tunnel_groups = self._agents.tunnel_groups
            if tunnel_groups and not self._agents.token_groups:
                for name in self.router.tunnels.keys() - tunnel_groups.keys():
                    log.warning("tunnel %r has no token and the relay has none: any agent may serve it", name)
            task_status.started()

    async def drain(self, grace: float) -> None:
        """Graceful stop (SIGTERM): close the HTTP listener, turn new agents away, let the exchanges in
        progress finish within `grace` seconds. Idle keep-alive connections are closed at once; busy ones
        after their current exchange. The caller then cancels whatever is left."""
        # Every agent learns first, so that it can dial another relay while this one drains (SPEC 10).
        self._agents.goaway_all()
        await self._clients.drain(grace)
        await self._agents.close_all()
