"""`rtunnel serve`: accept agents' WebSockets and clients' HTTP, and join them stream by stream.

Named tunnels: an agent names the tunnel it serves in its upgrade request (`X-Rtunnel-Tunnel: NAME`). A tunnel
with its own token can be served with that token only, and that token serves nothing else; a tunnel without
one is served with the relay's tokens (--token/--token-file). An agent that names no tunnel serves the one its
token belongs to. A relay without tunnels refuses agents that name one (404): a misconfiguration must show.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import ssl
from collections.abc import Sequence
from functools import partial

import trio

from protocol import RemoteProtocolError, Role, Settings

from ..config import TokenGroup
from ..link import transport
from ..link.mux import LinkDead, Multiplexer, close_code
from ..net.clientaddr import ProxyHeaderGate, TrustedProxies, peer_ip
from ..net.limits import AuthThrottle, Counter
from ..ops.inspector import Inspector
from ..ops.metrics import Metrics
from ..startup import listening
from .exchange import ClientConnection, HttpLimits
from .registry import Tunnel, TunnelRouter

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


# The upgrade request header in which an agent names the tunnel it serves (`rtunnel dial --tunnel NAME`).
TUNNEL_HEADER = "X-Rtunnel-Tunnel"


@dataclasses.dataclass(frozen=True)
class AgentIdentity:
    """Who an authenticated agent is: the token it presented and the tunnel it serves (None: unnamed)."""

    group: TokenGroup
    tunnel: str | None


_NO_AUTH = TokenGroup("no authentication", b"")


def authenticate(groups: tuple[TokenGroup, ...], presented: bytes | None) -> TokenGroup | None:
    """The group whose token was presented, or None. Without any token configured, every agent is accepted.

    Every token is compared, in constant time, without stopping at a match, so timing reveals neither
    whether nor which token matched."""
    if not groups:
        return _NO_AUTH
    if presented is None:
        return None
    matched: TokenGroup | None = None
    for group in groups:
        if hmac.compare_digest(presented, group.token) and matched is None:
            matched = group
    return matched


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.router = TunnelRouter(config.agent_wait, config.tunnels)
        # The tokens of tunnels that have their own; each serves its tunnel only.
        self._tunnel_groups = {
            t.name: TokenGroup(f"the token of tunnel {t.name!r}", t.token)
            for t in config.tunnels
            if t.token is not None
        }
        self.metrics = Metrics("relay")
        self.inspector: Inspector | None = None  # --inspect: every client connection records into it
        self.http_address: tuple[str, int] | None = None
        self.agents_address: tuple[str, int] | None = None
        self._draining = False
        self._http_accepting = trio.CancelScope()
        self._http_closed = trio.Event()
        self._handlers: trio.Nursery | None = None  # where client connections' tasks run (run's nursery)
        # Client connections and the scope each runs in (drain() cancels the idle ones).
        self._clients: dict[ClientConnection, trio.CancelScope] = {}
        self._clients_changed = trio.Event()
        self.token_groups = config.token_groups or tuple(
            TokenGroup("the token" if len(config.tokens) == 1 else f"token {i}", t)
            for i, t in enumerate(config.tokens, 1)
        )
        # Each connected agent's token group, and the scope its connection runs in (revocation cancels it).
        self._agent_groups: dict[Multiplexer, tuple[TokenGroup, trio.CancelScope]] = {}
        self._agent_links: dict[Multiplexer, transport.Transport] = {}  # for the Close on shutdown
        self._auth_throttle = AuthThrottle(config.auth_fail_limit, config.auth_fail_window)
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

    def _all_groups(self) -> tuple[TokenGroup, ...]:
        return (*self.token_groups, *self._tunnel_groups.values())

    def _authenticate(self, presented: bytes | None) -> TokenGroup | None:
        """The group of the presented token among the relay's and the tunnels' tokens (constant time).

        Without relay tokens, tunnels that have no token of their own are open: any agent gets _NO_AUTH
        (and _authorize keeps it away from tunnels that do have one)."""
        matched = authenticate(self._all_groups(), presented)
        if matched is None and not self.token_groups:
            return _NO_AUTH
        return matched

    def _authorize(self, principal: object, headers: Sequence[tuple[bytes, bytes]]) -> object:
        """The tunnel an authenticated agent may serve (an AgentIdentity), or why not (a Refusal)."""
        assert isinstance(principal, TokenGroup)
        names = [v for k, v in headers if k == TUNNEL_HEADER.lower().encode()]
        if len(names) > 1:
            return transport.Refusal(400, f"{TUNNEL_HEADER} given more than once")
        name = names[0].decode("latin-1").strip() if names else None
        tunnels = self.router.tunnels
        own = next((n for n, g in self._tunnel_groups.items() if g is principal), None)
        if not tunnels:
            if name is not None:
                return transport.Refusal(404, f"this relay has no named tunnels (asked for {name!r})")
            return AgentIdentity(principal, None)
        if name is None:
            if own is None:
                return transport.Refusal(
                    403, "this relay serves named tunnels: name one (rtunnel dial --tunnel NAME)"
                )
            name = own
        tunnel = tunnels.get(name)
        if tunnel is None:
            return transport.Refusal(404, f"no tunnel named {name[:100]!r} on this relay")
        if tunnel.token is not None:
            if own == name:
                return AgentIdentity(principal, name)
            if principal is _NO_AUTH:
                return transport.Refusal(401, "missing or wrong token")
            return transport.Refusal(403, f"this token may not serve tunnel {name!r}")
        if own is not None:  # another tunnel's token
            return transport.Refusal(403, f"this token may not serve tunnel {name!r}")
        return AgentIdentity(principal, name)

    def reload_tokens(self, groups: tuple[TokenGroup, ...]) -> None:
        """Replace the accepted tokens (SIGHUP). Agents connected with a token no longer listed are
        disconnected at once; their new attempts get 401."""
        if not groups and self.token_groups:
            log.error("token reload: the new token list is empty; keeping the current tokens")
            return
        kept = {group.token for group in (*groups, *self._tunnel_groups.values())}
        revoked = [(mux, *entry) for mux, entry in self._agent_groups.items() if entry[0].token not in kept]
        self.token_groups = groups
        log.info("tokens reloaded: %d accepted, %d connected agents revoked", len(groups), len(revoked))
        for mux, group, scope in revoked:
            log.warning("%s: %s was revoked: disconnecting it", mux.name, group)
            mux.abort(f"{group} was revoked")
            scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        async with trio.open_nursery() as nursery:
            with listening("--agents", config.agents_host, config.agents_port):
                self.agents_address = await nursery.start(
                    partial(
                        transport.serve,
                        self._on_agent,
                        config.agents_host,
                        config.agents_port,
                        authenticate=self._authenticate,
                        authorize=self._authorize,
                        ssl_context=config.ssl_context,
                        auth_throttle=self._auth_throttle,
                        proxy_protocol=config.agents_proxy_protocol,
                    )
                )
            # Client handlers run in the outer nursery, so drain() can close the listener alone.
            self._handlers = nursery
            with listening("--http", config.http_host, config.http_port):
                listeners = await nursery.start(self._serve_http, nursery)
            sockname = listeners[0].socket.getsockname()
            self.http_address = (sockname[0], sockname[1])
            scheme = "wss" if config.ssl_context else "ws"
            log.info(
                "listening http=%s:%d agents=%s:%d (%s)%s",
                *self.http_address,
                *self.agents_address,
                scheme,
                "" if self._all_groups() else " WITHOUT agent authentication (no token set)",
            )
            if self._tunnel_groups and not self.token_groups:
                for name in self.router.tunnels.keys() - self._tunnel_groups.keys():
                    log.warning("tunnel %r has no token and the relay has none: any agent may serve it", name)
            task_status.started()

    async def _serve_http(
        self, handler_nursery: trio.Nursery, *, task_status: trio.TaskStatus[list[trio.SocketListener]]
    ) -> None:
        config = self.config
        try:
            with self._http_accepting:
                await trio.serve_tcp(
                    self._on_client,
                    config.http_port,
                    host=config.http_host,
                    handler_nursery=handler_nursery,
                    task_status=task_status,
                )
        finally:
            self._http_closed.set()  # the listening sockets are closed by now

    async def drain(self, grace: float) -> None:
        """Graceful stop (SIGTERM): close the HTTP listener, turn new agents away, let the exchanges in
        progress finish within `grace` seconds. Idle keep-alive connections are closed at once; busy ones
        after their current exchange. The caller then cancels whatever is left."""
        self._draining = True
        # Every agent learns first, so that it can dial another relay while this one drains (SPEC 10).
        for mux in self._agent_links:
            mux.goaway()
        self._http_accepting.cancel()
        if self.http_address is not None:  # the listener was up: wait until its sockets are closed
            await self._http_closed.wait()
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
        await self._close_agents()

    async def _close_agents(self) -> None:
        """End every agent connection with a WebSocket Close 1001 (going away), not a dropped TCP connection:
        the agent then knows the relay ended it on purpose. Each close is bounded by the transport's timeout."""
        async with trio.open_nursery() as nursery:
            for mux, link in list(self._agent_links.items()):
                mux.close_reason = mux.close_reason or "the relay is shutting down"
                nursery.start_soon(partial(link.aclose, transport.CLOSE_GOING_AWAY, "relay shutting down"))

    def _notify_clients(self) -> None:
        self._clients_changed.set()
        self._clients_changed = trio.Event()

    async def _on_agent(self, link: transport.Transport) -> None:
        if self._draining:
            log.info("agent %s turned away: the relay is shutting down", link.remote)
            # Going away (SPEC 10.2): the agent retries elsewhere or later.
            await link.aclose(transport.CLOSE_GOING_AWAY, "relay shutting down")
            return
        mux = Multiplexer(
            link,
            Role.ACCEPTOR,
            settings=self.config.settings,
            ping_interval=self.config.ping_interval,
            dead_timeout=self.config.dead_timeout,
            stall_timeout=self.config.stall_timeout,
            name=f"agent {link.remote}",
        )
        identity = link.principal
        if not isinstance(identity, AgentIdentity):
            identity = AgentIdentity(_NO_AUTH, None)
        group, tunnel = identity.group, identity.tunnel
        registry = self.router.registry(tunnel)
        goaway = trio.Event()

        def on_goaway() -> None:
            goaway.set()
            registry.notify()  # waiting requests look for another agent

        mux.on_goaway = on_goaway
        reason = ""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(mux.run)
                self._agent_groups[mux] = (group, nursery.cancel_scope)
                if group is not _NO_AUTH and group.token not in {g.token for g in self._all_groups()}:
                    # A SIGHUP revoked it while its handshake was in progress.
                    mux.abort(f"{group} was revoked")
                    nursery.cancel_scope.cancel()
                else:
                    registry.add(mux)
                    self._agent_links[mux] = link
                    if self._draining:  # drain() began while this agent was connecting
                        mux.goaway()
                    self.metrics.link_up(mux, link.remote, tunnel=tunnel)
                    what = "" if tunnel is None else f" for tunnel {tunnel!r}"
                    count = len(registry.agents)
                    log.info("agent connected from %s%s (%d connected)", link.remote, what, count)
                    nursery.start_soon(self._close_when_drained, mux, goaway)
        except* (LinkDead, RemoteProtocolError, transport.TransportClosed) as errors:
            error = errors.exceptions[0]
            reason = str(error)
            if isinstance(error, RemoteProtocolError):
                # What we told the agent, so an operator can match it with the agent's own log; the GOAWAY is
                # out, so the WebSocket Close handshake follows it (SPEC 10).
                reason += f" (sent GOAWAY {error.error_code.name})"
                await link.aclose(close_code(error))
            link.abort()  # a dead link would make a graceful close wait for a Close that never comes
        finally:
            self._agent_groups.pop(mux, None)
            self._agent_links.pop(mux, None)
            registry.remove(mux)
            self.metrics.link_down(mux)
        reason = reason or mux.close_reason
        log.info("agent %s disconnected: %s (%d connected)", link.remote, reason, len(registry.agents))

    @staticmethod
    async def _close_when_drained(mux: Multiplexer, goaway: trio.Event) -> None:
        """An agent that sent GOAWAY is draining: once its last exchange is done, close the connection.

        Closing from this side proves to the agent that we read its GOAWAY (frames arrive in order), so any
        request we had sent it meanwhile was refused and retried elsewhere: the agent can then exit safely.
        """
        await goaway.wait()
        await mux.wait_idle()
        mux.abort("the agent is draining and has no exchange left")

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
                if self._draining:
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
