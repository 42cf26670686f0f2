"""`rtunnel serve`: accept agents' WebSockets and clients' HTTP, and join them stream by stream."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import ssl
from functools import partial

import trio

from protocol import RemoteProtocolError, Role, Settings

from . import transport
from .mux import LinkDead, Multiplexer
from .registry import AgentRegistry
from .relay_http import ClientConnection, HttpLimits

log = logging.getLogger("rtunnel.relay")


@dataclasses.dataclass
class RelayConfig:
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    agents_host: str = "127.0.0.1"
    agents_port: int = 8443
    tokens: tuple[bytes, ...] = ()
    ssl_context: ssl.SSLContext | None = None
    agent_wait: float = 10.0
    http_limits: HttpLimits = dataclasses.field(default_factory=HttpLimits)
    ping_interval: float = 5.0
    dead_timeout: float = 20.0
    # The relay opens streams and accepts none, so it grants agents no concurrent streams of their own.
    settings: Settings = dataclasses.field(default_factory=lambda: Settings(max_concurrent_streams=0))


def make_authenticator(tokens: tuple[bytes, ...]) -> partial[bool]:
    return partial(_authenticate, tokens)


def _authenticate(tokens: tuple[bytes, ...], presented: bytes | None) -> bool:
    if not tokens:
        return True
    if presented is None:
        return False
    # Compare against every token without stopping early, so timing does not reveal which one matched.
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented, token)
    return matched


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.registry = AgentRegistry(config.agent_wait)
        self.http_address: tuple[str, int] | None = None
        self.agents_address: tuple[str, int] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        async with trio.open_nursery() as nursery:
            self.agents_address = await nursery.start(
                partial(
                    transport.serve,
                    self._on_agent,
                    config.agents_host,
                    config.agents_port,
                    authenticate=make_authenticator(config.tokens),
                    ssl_context=config.ssl_context,
                )
            )
            listeners = await nursery.start(
                partial(trio.serve_tcp, self._on_client, config.http_port, host=config.http_host)
            )
            sockname = listeners[0].socket.getsockname()
            self.http_address = (sockname[0], sockname[1])
            scheme = "wss" if config.ssl_context else "ws"
            log.info(
                "listening http=%s:%d agents=%s:%d (%s)%s",
                *self.http_address,
                *self.agents_address,
                scheme,
                "" if config.tokens else " WITHOUT agent authentication (no token set)",
            )
            task_status.started()

    async def _on_agent(self, link: transport.Transport) -> None:
        mux = Multiplexer(
            link,
            Role.ACCEPTOR,
            settings=self.config.settings,
            ping_interval=self.config.ping_interval,
            dead_timeout=self.config.dead_timeout,
            name=f"agent {link.remote}",
        )
        mux.on_goaway = self.registry.notify
        reason = "closed"
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(mux.run)
                self.registry.add(mux)
                log.info("agent connected from %s (%d connected)", link.remote, len(self.registry.agents))
        except* (LinkDead, RemoteProtocolError, transport.TransportClosed) as group:
            reason = str(group.exceptions[0])
            link.abort()  # a dead link would make a graceful close wait for a Close that never comes
        finally:
            self.registry.remove(mux)
        log.info("agent %s disconnected: %s (%d connected)", link.remote, reason, len(self.registry.agents))

    async def _on_client(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
            client_ip = str(peer[0])
        except OSError:
            return
        connection = ClientConnection(stream, self.registry, self.config.http_limits, client_ip=client_ip)
        try:
            await connection.serve()
        except Exception:
            # One client's bug must never take the listener (and every other client) down.
            log.exception("client %s: unexpected error", client_ip)
