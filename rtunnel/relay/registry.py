"""The relay's table of connected agents, and how a request finds one.

Agents that authenticated with the relay's token serve together: each new exchange goes to the connected agent
with the fewest exchanges in flight (ties: the newest connection). Nothing limits how many connections an agent
may have, so a reconnecting agent is accepted at once even before its old connection is known to be dead.
A request that arrives while no agent is connected waits (up to the relay's `--agent-wait`) for one to appear
instead of failing at once.

Named tunnels: one relay may serve several tunnels, each with its own agents (its own `AgentRegistry`).
`TunnelRouter` picks the tunnel of a request by its Host header and/or path prefix; without any tunnel
configured it has a single unnamed one that takes every request (the relay then behaves as if tunnels did not
exist).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import trio

from protocol import RequestHead

from ..http.target import TargetRefused, normalize_target
from ..link.mux import Multiplexer, MuxClosed, MuxStream

log = logging.getLogger("rtunnel.relay")


class NoAgentAvailable(Exception):
    """No agent could take the exchange within the wait."""


class AgentRegistry:
    def __init__(self, agent_wait: float) -> None:
        self.agent_wait = agent_wait
        self._agents: list[Multiplexer] = []
        self._changed = trio.Event()

    @property
    def agents(self) -> list[Multiplexer]:
        return list(self._agents)

    def add(self, mux: Multiplexer) -> None:
        self._agents.append(mux)
        self._notify()

    def remove(self, mux: Multiplexer) -> None:
        if mux in self._agents:
            self._agents.remove(mux)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def notify(self) -> None:
        """Something about an agent changed (e.g. a GOAWAY): waiters look again."""
        self._notify()

    def pick(self, avoid: Multiplexer | None = None) -> Multiplexer | None:
        """The agent for a new exchange; `avoid` (the one that just refused or lost it) only if it is the
        only one left."""
        candidates = [mux for mux in self._agents if mux.accepting_streams]
        if avoid in candidates and len(candidates) > 1:
            candidates.remove(avoid)
        if not candidates:
            # Every live agent is at its concurrent-stream limit: queue in the least-loaded one's open_stream,
            # which wakes as soon as one of its streams ends. (Waiting on this registry's event instead would
            # sleep until --agent-wait ran out: it fires on connects and GOAWAYs, not on finished streams.)
            candidates = [mux for mux in self._agents if not mux.is_closed and not mux.goaway_received]
        if not candidates:
            return None
        # Ties go to the most recently connected agent: when an agent reconnects after a link failure, its
        # old connection may be dead without the relay knowing yet (that takes up to the dead timeout),
        # while the new one is certainly alive. So a reconnected agent is used at once: no stale slot.
        return min(reversed(candidates), key=lambda mux: mux.in_flight)

    async def open_exchange(
        self,
        head: RequestHead,
        *,
        end_stream: bool,
        wait: float | None = None,
        avoid: Multiplexer | None = None,
    ) -> tuple[Multiplexer, MuxStream]:
        """Open a stream for one exchange on the least-loaded agent, waiting for one to connect if needed.

        `avoid`: an agent to use only if no other can take the exchange (a retry goes elsewhere if it can).
        A head the wire format cannot carry raises protocol's HeadNotEncodable at once: no agent would take
        it, so it is not retried."""
        deadline = trio.current_time() + (self.agent_wait if wait is None else wait)
        waited_for_another = avoid is None
        while True:
            mux = self.pick(avoid)
            if mux is not None and mux is avoid and not waited_for_another:
                # Only the agent that just refused the exchange is left: rather than bounce off it again at
                # once, give another agent (or its GOAWAY) until the deadline to show up, then try it again.
                waited_for_another = True
                changed = self._changed
                with trio.move_on_at(deadline):
                    await changed.wait()
                continue
            if mux is not None:
                try:
                    with trio.move_on_at(deadline):
                        return mux, await mux.open_stream(head, end_stream=end_stream)
                except MuxClosed:
                    # It started draining or died between pick and open: pick() skips it from now on, so the
                    # next round sees a changed table. The checkpoint and the deadline make sure that even a
                    # round that changed nothing cannot keep this task from yielding.
                    if trio.current_time() >= deadline:
                        raise NoAgentAvailable("every agent closed or started draining") from None
                    await trio.lowlevel.checkpoint()
                    continue
                raise NoAgentAvailable("every agent is at its concurrent-stream limit")
            if trio.current_time() >= deadline:
                raise NoAgentAvailable("no agent is connected")
            changed = self._changed
            with trio.move_on_at(deadline):
                await changed.wait()


# -- named tunnels -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tunnel:
    """One named tunnel of the relay and the requests it takes.

    `hosts`: Host header values (compared without case, trailing dot and port; a value that names a port
    must match the port too). `path_prefix`: a path such as ``/api``, matched on whole segments (``/api``
    and ``/api/x``, not ``/apix``). With both, a request must match both; with neither, the tunnel takes
    every request no other tunnel takes. `strip_prefix`: forward ``/api/x`` as ``/x`` (the default).
    `token`: the only token an agent may serve this tunnel with (None: the relay's own tokens)."""

    name: str
    hosts: tuple[str, ...] = ()
    path_prefix: str | None = None
    strip_prefix: bool = True
    token: bytes | None = dataclasses.field(default=None, repr=False)

    @property
    def prefix(self) -> bytes | None:
        """The prefix to match, without a trailing slash (None: none, or ``/``, which matches everything)."""
        if self.path_prefix is None:
            return None
        prefix = self.path_prefix.encode("utf-8").rstrip(b"/")
        return prefix or None


@dataclasses.dataclass(frozen=True)
class Route:
    """Where a request goes: the tunnel's name (None: the unnamed default), its agents, the request-target
    to forward, and the prefix stripped from it (for X-Forwarded-Prefix)."""

    tunnel: str | None
    registry: AgentRegistry
    target: bytes
    stripped_prefix: bytes | None = None

    def forwarded(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The request headers for this route: X-Forwarded-Prefix names the prefix the relay stripped.

        A client's own X-Forwarded-Prefix is gone already (proxyheaders.add_forwarding drops it)."""
        if self.stripped_prefix is not None:
            headers = [*headers, (b"X-Forwarded-Prefix", self.stripped_prefix)]
        return headers


@dataclasses.dataclass(frozen=True)
class NoRoute:
    """No tunnel takes the request: the client gets `status` with `reason` as the body."""

    status: int
    reason: str


def _host_forms(host: bytes) -> tuple[bytes, bytes]:
    """(host with port, host without port), lower case, trailing dot removed. IPv6 literals keep brackets."""
    host = host.strip().lower()
    name, port = host, b""
    if host.startswith(b"["):
        end = host.find(b"]")
        if end != -1:
            name, port = host[: end + 1], host[end + 1 :].removeprefix(b":")
    elif host.count(b":") == 1:
        name, _, port = host.partition(b":")
    name = name.rstrip(b".")
    return (name + b":" + port if port else name), name


class TunnelRouter:
    """The relay's tunnels, each with its own agents, and the routing of requests to them."""

    def __init__(self, agent_wait: float, tunnels: Sequence[Tunnel] = ()) -> None:
        self.tunnels: dict[str, Tunnel] = {tunnel.name: tunnel for tunnel in tunnels}
        if len(self.tunnels) != len(tunnels):
            raise ValueError("tunnel names must be unique")
        names: list[str | None] = list(self.tunnels) or [None]
        self.registries: dict[str | None, AgentRegistry] = {name: AgentRegistry(agent_wait) for name in names}
        self._by_host: dict[bytes, Tunnel] = {}
        for tunnel in tunnels:
            for host in tunnel.hosts:
                # Clients send internationalized names in their ASCII (punycode) form.
                with_port, bare = _host_forms(host.encode("ascii") if host.isascii() else host.encode("idna"))
                key = with_port if with_port != bare else bare
                if key in self._by_host:
                    raise ValueError(f"host {host!r} is routed to two tunnels")
                self._by_host[key] = tunnel

    @property
    def agents(self) -> list[Multiplexer]:
        """Every connected agent, of every tunnel."""
        return [mux for registry in self.registries.values() for mux in registry.agents]

    def registry(self, tunnel: str | None) -> AgentRegistry:
        """The agents of `tunnel` (None: the unnamed one of a relay without tunnels). KeyError if unknown."""
        return self.registries[tunnel]

    def route(self, host: bytes | None, target: bytes) -> Route | NoRoute:
        """The tunnel for a request with this Host value and request-target."""
        if not self.tunnels:
            return Route(None, self.registries[None], target)
        candidates = list(self.tunnels.values())
        by_host: Tunnel | None = None
        if host is not None:
            with_port, bare = _host_forms(host)
            by_host = self._by_host.get(with_port) or self._by_host.get(bare)
        # A tunnel that names hosts takes only requests for them; the others take any host.
        candidates = [t for t in candidates if t is by_host or not t.hosts]
        path: bytes | None = None
        query: bytes | None = None
        if any(t.prefix is not None for t in candidates):
            # Prefixes are matched on the normalized path (the one the agent's allowlist checks, too), so
            # that /%61pi or /x/../api cannot reach another tunnel than /api does.
            normalized = normalize_target(target)
            if isinstance(normalized, TargetRefused):
                return NoRoute(normalized.status, f"bad request-target: {normalized.reason}")
            path, query = normalized.path, normalized.query
        best: Tunnel | None = None
        best_rank = (-1, -1)
        for tunnel in candidates:
            prefix = tunnel.prefix
            if prefix is not None:
                assert path is not None
                if not (path == prefix or path.startswith(prefix + b"/")):
                    continue
            rank = (1 if tunnel.hosts else 0, len(prefix) if prefix is not None else -1)
            if rank > best_rank:
                best, best_rank = tunnel, rank
        if best is None:
            shown = host.decode("latin-1") if host is not None else "(none)"
            path_text = target.split(b"?", 1)[0][:200].decode("latin-1")
            return NoRoute(404, f"no tunnel on this relay serves host {shown!r} with path {path_text!r}")
        prefix = best.prefix
        if prefix is None or not best.strip_prefix:
            return Route(best.name, self.registries[best.name], target)
        assert path is not None
        rest = path[len(prefix) :] or b"/"
        stripped = rest if query is None else rest + b"?" + query
        return Route(best.name, self.registries[best.name], stripped, stripped_prefix=prefix)
