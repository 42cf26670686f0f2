"""The relay's agents' side: who may connect (tokens, constant-time), which tunnel each may serve, and each
agent link's life, from its multiplexer joining the tunnel's registry to its goodbye.

Named tunnels: an agent names the tunnel it serves in its upgrade request (`X-Rtunnel-Tunnel: NAME`). A tunnel
with its own token can be served with that token only, and that token serves nothing else; a tunnel without
one is served with the relay's tokens (--token/--token-file). An agent that names no tunnel serves the one its
token belongs to. A relay without tunnels refuses agents that name one (404): a misconfiguration must show.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import trio

from protocol import RemoteProtocolError, Role

from ..config import TokenGroup
from ..link import transport
from ..link.mux import LinkDead, Multiplexer, close_code
from ..net.limits import AuthThrottle
from ..ops.metrics import Metrics
from .registry import AgentRegistry, TunnelRouter

if TYPE_CHECKING:
    from .server import RelayConfig

__all__ = ["TUNNEL_HEADER", "AgentIdentity", "Agents", "authenticate"]

log = logging.getLogger("rtunnel.relay")

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


class Agents:
    """The agents' listener and the agents connected through it."""

    def __init__(self, config: RelayConfig, router: TunnelRouter, metrics: Metrics) -> None:
        self.config = config
        self.router = router
        self.metrics = metrics
        # The tokens of tunnels that have their own; each serves its tunnel only.
        self.tunnel_groups = {
            t.name: TokenGroup(f"the token of tunnel {t.name!r}", t.token)
            for t in config.tunnels
            if t.token is not None
        }
        self.token_groups = config.token_groups or tuple(
            TokenGroup("the token" if len(config.tokens) == 1 else f"token {i}", t)
            for i, t in enumerate(config.tokens, 1)
        )
        self.draining = False  # new agents are turned away (the relay is shutting down)
        # Each connected agent's token group, and the scope its connection runs in (revocation cancels it).
        self._agent_groups: dict[Multiplexer, tuple[TokenGroup, trio.CancelScope]] = {}
        self._agent_links: dict[Multiplexer, transport.Transport] = {}  # for the Close on shutdown
        self._auth_throttle = AuthThrottle(config.auth_fail_limit, config.auth_fail_window)

    def all_groups(self) -> tuple[TokenGroup, ...]:
        return (*self.token_groups, *self.tunnel_groups.values())

    async def serve(self, *, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        """The agents' listener (--agents): WebSocket handshakes, then one multiplexer per agent."""
        config = self.config
        await transport.serve(
            self._on_agent,
            config.agents_host,
            config.agents_port,
            authenticate=self._authenticate,
            authorize=self._authorize,
            ssl_context=config.ssl_context,
            auth_throttle=self._auth_throttle,
            proxy_protocol=config.agents_proxy_protocol,
            task_status=task_status,
        )

    def _authenticate(self, presented: bytes | None) -> TokenGroup | None:
        """The group of the presented token among the relay's and the tunnels' tokens (constant time).

        Without relay tokens, tunnels that have no token of their own are open: any agent gets _NO_AUTH
        (and _authorize keeps it away from tunnels that do have one)."""
        matched = authenticate(self.all_groups(), presented)
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
        own = next((n for n, g in self.tunnel_groups.items() if g is principal), None)
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
        kept = {group.token for group in (*groups, *self.tunnel_groups.values())}
        revoked = [(mux, *entry) for mux, entry in self._agent_groups.items() if entry[0].token not in kept]
        self.token_groups = groups
        log.info("tokens reloaded: %d accepted, %d connected agents revoked", len(groups), len(revoked))
        for mux, group, scope in revoked:
            log.warning("%s: %s was revoked: disconnecting it", mux.name, group)
            mux.abort(f"{group} was revoked")
            scope.cancel()

    def goaway_all(self) -> None:
        """Tell every agent that the relay drains, so that it can dial another relay meanwhile (SPEC 10)."""
        self.draining = True
        for mux in self._agent_links:
            mux.goaway()

    async def close_all(self) -> None:
        """End every agent connection with a WebSocket Close 1001 (going away), not a dropped TCP connection:
        the agent then knows the relay ended it on purpose. Each close is bounded by the transport's timeout."""
        async with trio.open_nursery() as nursery:
            for mux, link in list(self._agent_links.items()):
                mux.close_reason = mux.close_reason or "the relay is shutting down"
                nursery.start_soon(partial(link.aclose, transport.CLOSE_GOING_AWAY, "relay shutting down"))

    async def _on_agent(self, link: transport.Transport) -> None:
        if self.draining:
            log.info("agent %s turned away: the relay is shutting down", link.remote)
            # Going away (SPEC 10.2): the agent retries elsewhere or later.
            await link.aclose(transport.CLOSE_GOING_AWAY, "relay shutting down")
            return
        config = self.config
        mux = Multiplexer(
            link,
            Role.ACCEPTOR,
            settings=config.settings,
            ping_interval=config.ping_interval,
            dead_timeout=config.dead_timeout,
            stall_timeout=config.stall_timeout,
            name=f"agent {link.remote}",
        )
        identity = link.principal
        if not isinstance(identity, AgentIdentity):
            identity = AgentIdentity(_NO_AUTH, None)
        registry = self.router.registry(identity.tunnel)
        goaway = trio.Event()

        def on_goaway() -> None:
            goaway.set()
            registry.notify()  # waiting requests look for another agent

        mux.on_goaway = on_goaway
        reason = ""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(mux.run)
                if self._join(mux, link, identity, registry, nursery):
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

    def _join(
        self,
        mux: Multiplexer,
        link: transport.Transport,
        identity: AgentIdentity,
        registry: AgentRegistry,
        nursery: trio.Nursery,
    ) -> bool:
        """The agent's link is up: serve its tunnel, unless its token was revoked meanwhile (False)."""
        group, tunnel = identity.group, identity.tunnel
        self._agent_groups[mux] = (group, nursery.cancel_scope)
        if group is not _NO_AUTH and group.token not in {g.token for g in self.all_groups()}:
            # A SIGHUP revoked it while its handshake was in progress.
            mux.abort(f"{group} was revoked")
            nursery.cancel_scope.cancel()
            return False
        registry.add(mux)
        self._agent_links[mux] = link
        if self.draining:  # drain() began while this agent was connecting
            mux.goaway()
        self.metrics.link_up(mux, link.remote, tunnel=tunnel)
        what = "" if tunnel is None else f" for tunnel {tunnel!r}"
        log.info("agent connected from %s%s (%d connected)", link.remote, what, len(registry.agents))
        return True

    @staticmethod
    async def _close_when_drained(mux: Multiplexer, goaway: trio.Event) -> None:
        """An agent that sent GOAWAY is draining: once its last exchange is done, close the connection.

        Closing from this side proves to the agent that we read its GOAWAY (frames arrive in order), so any
        request we had sent it meanwhile was refused and retried elsewhere: the agent can then exit safely.
        """
        await goaway.wait()
        await mux.wait_idle()
        mux.abort("the agent is draining and has no exchange left")
