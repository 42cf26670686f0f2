"""The relay's clients' listener (--http): who each connection's client is (its peer, a PROXY header, a trusted
proxy's X-Forwarded-For), the connection limits (with idle connections reclaimed at the total), one
`ClientConnection` task per connection, and the drain of those at shutdown."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import trio

from ..net.clientaddr import ProxyHeaderGate, TrustedProxies, peer_ip
from ..net.limits import Counter
from ..ops.inspector import Inspector
from ..ops.metrics import Metrics
from .connection import ClientConnection
from .registry import TunnelRouter

if TYPE_CHECKING:
    from .server import RelayConfig

__all__ = ["Clients"]

log = logging.getLogger("rtunnel.relay")


class Clients:
    """The clients' listener and the connections it accepted."""

    def __init__(self, config: RelayConfig, router: TunnelRouter, metrics: Metrics) -> None:
        self.config = config
        self.router = router
        self.metrics = metrics
        self.inspector: Inspector | None = None  # --inspect: every client connection records into it
        self.address: tuple[str, int] | None = None  # set once the listener is up
        self.draining = False
        self._accepting = trio.CancelScope()
        self._closed = trio.Event()
        self._handlers: trio.Nursery | None = None  # where client connections' tasks run (run's nursery)
        # Client connections and the scope each runs in (drain() cancels the idle ones).
        self._clients: dict[ClientConnection, trio.CancelScope] = {}
        self._clients_changed = trio.Event()
        limits = config.http_limits
        self._connections = Counter(total=limits.max_connections, per_key=limits.max_connections_per_ip)
        self._exchanges = Counter(per_key=limits.max_exchanges_per_ip)
        self._refusals_logged: set[str] = set()
        self._trusted = TrustedProxies(config.trusted_proxies)
        self._proxy_header = (
            ProxyHeaderGate("http listener", limits.head_timeout) if config.proxy_protocol else None
        )

    @property
    def connection_count(self) -> int:
        """Client connections on the HTTP listener, as counted against --max-connections."""
        return self._connections.total

    async def serve(
        self, handler_nursery: trio.Nursery, *, task_status: trio.TaskStatus[list[trio.SocketListener]]
    ) -> None:
        """The listener; each connection's task runs in `handler_nursery`, so drain() can close the listener
        alone."""
        config = self.config
        self._handlers = handler_nursery
        try:
            with self._accepting:
                await trio.serve_tcp(
                    self._on_client,
                    config.http_port,
                    host=config.http_host,
                    handler_nursery=handler_nursery,
                    task_status=task_status,
                )
        finally:
            self._closed.set()  # the listening sockets are closed by now

    async def drain(self, grace: float) -> None:
        """Close the listener, close idle keep-alive connections at once and busy ones after their current
        exchange, waiting at most `grace` seconds for those."""
        self.draining = True
        self._accepting.cancel()
        if self.address is not None:  # the listener was up: wait until its sockets are closed
            await self._closed.wait()
        busy = 0
        for connection, scope in self._clients.items():
            connection.draining = True
            if connection.busy:
                busy += 1
            else:
                scope.cancel()
        log.info("draining: %d exchanges in progress, grace period %g s", busy, grace)
        with trio.move_on_after(grace):
            while any(connection.busy for connection in self._clients):
                await self._clients_changed.wait()
        left = sum(1 for connection in self._clients if connection.busy)
        if left:
            log.warning("grace period over: cutting %d exchanges still in progress", left)
        else:
            log.info("drained: no exchange left")

    def _notify_clients(self) -> None:
        self._clients_changed.set()
        self._clients_changed = trio.Event()

    async def _on_client(self, stream: trio.SocketStream) -> None:
        client_ip = peer_ip(stream.socket)
        if client_ip is None:
            return
        if self._proxy_header is not None:
            client_ip = await self._proxied_client(stream, client_ip)
            if client_ip is None:
                return
        # A trusted proxy's connections carry many clients: only its exchanges are limited per client.
        trusted = self._trusted.contains(client_ip) if self._trusted else False
        refused = self._connections.acquire(client_ip, limit_key=not trusted)
        if refused == "total" and self._reclaim_idle_connection():
            refused = self._connections.acquire(client_ip, limit_key=not trusted)
        if refused is not None:
            await self._refuse(stream, refused, client_ip)
            return
        await self._serve_client(stream, client_ip, trusted)

    async def _refuse(self, stream: trio.SocketStream, refused: str, client_ip: str) -> None:
        if refused not in self._refusals_logged:
            self._refusals_logged.add(refused)  # once per kind: a flood must not flood the log too
            log.warning(
                "connection limit (%s) reached: refusing connections with 503, e.g. %s", refused, client_ip
            )
        await _refuse_connection(stream)

    async def _proxied_client(self, stream: trio.SocketStream, balancer: str) -> str | None:
        """The client a balancer's connection carries, from its PROXY header (None: closed, logged). While the
        header is awaited (at most --head-timeout) the connection counts in the total only: every connection of
        the balancer passes through this phase, however many clients it carries."""
        assert self._proxy_header is not None
        refused = self._connections.acquire(balancer, limit_key=False)
        if refused == "total" and self._reclaim_idle_connection():
            refused = self._connections.acquire(balancer, limit_key=False)
        if refused is not None:
            await self._refuse(stream, refused, balancer)
            return None
        try:
            header = await self._proxy_header.accept(stream.socket, balancer)
        finally:
            self._connections.release(balancer)
        if header is None:
            return None
        return header.client_address or balancer

    def _reclaim_idle_connection(self) -> bool:
        """At the total connection limit: close the connection idle the longest (between requests, or
        before its first), as nginx reuses keep-alive connections, so that a new client is served rather
        than refused because others keep connections open. Its slot is free at once."""
        idle = [connection for connection in self._clients if connection.idle_since is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda connection: connection.idle_since or 0.0)
        oldest.reclaim()
        self._connections.release(oldest.client_ip)
        if "reclaim" not in self._refusals_logged:
            self._refusals_logged.add("reclaim")  # once: under a flood this happens for every connection
            log.warning("connection limit reached: closing the longest idle connections to serve new ones")
        return True

    async def _serve_client(self, stream: trio.SocketStream, client_ip: str, trusted: bool) -> None:
        """Serve one client connection, which holds a slot of self._connections (given back at the end,
        unless it was reclaimed, which gave it back already)."""
        connection = ClientConnection(
            stream,
            self.router,
            self.config.http_limits,
            client_ip=client_ip,
            trusted_proxies=self._trusted if trusted else None,
            on_exchange=self.metrics.record_exchange,
            exchanges=self._exchanges,
            watchers=self._handlers,
        )
        connection.inspector = self.inspector
        try:
            with trio.CancelScope() as scope:
                if self.draining:
                    return  # accepted just before the listener closed
                self._clients[connection] = scope
                try:
                    await connection.serve()
                except Exception:
                    # One client's bug must never take the listener (and every other client) down.
                    log.exception("client %s: unexpected error", client_ip)
                finally:
                    del self._clients[connection]
                    self._notify_clients()
        finally:
            if not connection.reclaimed:
                self._connections.release(client_ip)


_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 29\r\n"
    b"Retry-After: 5\r\nConnection: close\r\n\r\ntoo many connections, retry\r\n"
)


async def _refuse_connection(stream: trio.abc.Stream) -> None:
    """Over the connection limit: a canned 503 and close, without reading anything. The write is bounded so
    a client that never reads cannot hold the connection open."""
    with (
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.send_all(_OVERLOADED)
