"""`rtunnel serve`: its options, and the relay they describe, checked and built before trio starts.

`relay_runner` is what both `rtunnel serve` (with signal handling around it, commands.py) and `rtunnel.serve`
(api.py) run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..config import ConfigError, TokenGroup, load_tokens, parse_address, read_token_file, server_tls_context
from ..startup import connect_hints
from .common import admin_options, admin_server, grace_option, liveness_options, token_options
from .configfile import TUNNEL_NAME, TunnelSpec, tunnel_token_env
from .values import check_durations, count, is_token_text, shown, size

if TYPE_CHECKING:
    from ..ops.admin import AdminServer
    from ..relay.limits import HttpLimits
    from ..relay.registry import Tunnel
    from ..relay.server import Relay, RelayConfig

__all__ = ["Listening", "RelayRunner", "add_serve_options", "relay_runner"]

log = logging.getLogger("rtunnel")

# durations where a negative number can only be a mistake (0 is "no limit" for the timeouts)
_NOT_NEGATIVE = (
    "agent_wait",
    "head_timeout",
    "idle_timeout",
    "body_timeout",
    "stall_timeout",
    "auth_fail_window",
    "grace",
)


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--http",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="where HTTP clients connect (port 0: any)",
    )
    serve.add_argument(
        "--agents", default="127.0.0.1:8443", metavar="HOST:PORT", help="where agents connect (port 0: any)"
    )
    token_options(serve)
    serve.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="certificate chain (PEM) for wss:// on --agents (default none: ws://)",
    )
    serve.add_argument("--tls-key", metavar="FILE", help="private key (PEM) for --tls-cert (default none)")
    serve.add_argument(
        "--agent-wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a request waits for an agent before 503 (default 10)",
    )
    grace_option(serve)
    serve.add_argument(
        "--tunnel",
        action="append",
        default=[],
        metavar="NAME=RULE[,RULE]",
        help="a named tunnel (repeatable; default none); RULE: host:HOSTNAME, prefix:/PATH, keep-prefix "
        "(its own token: $RTUNNEL_TUNNEL_<NAME>_TOKEN)",
    )
    liveness_options(serve)
    _balancer_options(serve)
    _limit_options(serve)
    admin_options(serve)


def _balancer_options(parser: argparse.ArgumentParser) -> None:
    """Behind a load balancer or proxy (README, "Several agents, several relays"): who the client is."""
    group = parser.add_argument_group("behind a load balancer")
    group.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="HTTP connections start with a PROXY protocol v1/v2 header (HAProxy send-proxy, nginx "
        "proxy_protocol); connections without one are closed (default off)",
    )
    group.add_argument(
        "--agents-proxy-protocol",
        action="store_true",
        help="the same for the agents' listener, the header before TLS (default off)",
    )
    group.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="believe X-Forwarded-For from these proxies (repeatable; default none): the client is its "
        "rightmost address outside them",
    )


def _limit_options(parser: argparse.ArgumentParser) -> None:
    """The relay's abuse limits (README, "Security model"). Defaults come from HttpLimits and RelayConfig."""
    from ..relay.limits import HttpLimits
    from ..relay.server import RelayConfig

    limits, relay = HttpLimits(), RelayConfig()
    group = parser.add_argument_group("limits (0 disables a limit)")

    def add(option: str, kind: Callable[[str], Any], default: Any, unit: str, what: str) -> None:
        default_text = "none" if default is None else shown(default)
        group.add_argument(
            option, type=kind, default=default or 0, metavar=unit, help=f"{what} (default {default_text})"
        )

    add("--max-head-size", size, limits.max_head_size, "BYTES", "request line + headers, else 431")
    add("--max-headers", count, limits.max_header_count, "N", "header fields per request, else 431")
    add("--max-body-size", size, limits.max_body_size, "BYTES", "request body, else 413")
    add("--head-timeout", float, limits.head_timeout, "SECONDS", "to receive a request head, else 408")
    add("--idle-timeout", float, limits.idle_timeout, "SECONDS", "keep-alive connection without a request")
    add(
        "--body-timeout",
        float,
        limits.body_timeout,
        "SECONDS",
        "a request body that stops arriving, else 408",
    )
    add("--max-connections", count, limits.max_connections, "N", "client connections in total, else 503")
    add(
        "--max-connections-per-ip",
        count,
        limits.max_connections_per_ip,
        "N",
        "client connections from one address, else 503",
    )
    add(
        "--max-exchanges-per-ip",
        count,
        limits.max_exchanges_per_ip,
        "N",
        "requests in progress from one address, else 429",
    )
    add(
        "--max-buffered",
        size,
        limits.max_buffered_bytes,
        "BYTES",
        "stream data buffered across all agents; beyond it new requests get 503",
    )
    add(
        "--stall-timeout",
        float,
        relay.stall_timeout,
        "SECONDS",
        "reset a stream whose agent grants no flow-control window, or drop a client that takes no response bytes, this long",
    )
    add("--auth-fail-limit", count, relay.auth_fail_limit, "N", "failed agent logins per address, then 429")
    add("--auth-fail-window", float, relay.auth_fail_window, "SECONDS", "window of --auth-fail-limit")


@dataclasses.dataclass(frozen=True)
class Listening:
    """Where a relay listens (what `nursery.start(rtunnel.serve, ...)` returns: ports may have been 0)."""

    http: tuple[str, int]
    agents: tuple[str, int]
    tls: bool = False

    @property
    def agents_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.agents[0]}:{self.agents[1]}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http[0]}:{self.http[1]}"


def relay_runner(args: argparse.Namespace) -> RelayRunner:
    """The relay of `serve`'s options (a bad one raises ConfigError), with its admin endpoint."""
    from ..ops.replay import ReplayClient
    from ..relay.server import Relay

    http = parse_address(args.http, "--http")
    agents = parse_address(args.agents, "--agents")
    groups = load_tokens(args.token, args.token_file)
    check_durations(args, *_NOT_NEGATIVE, "ping_interval", "dead_timeout")
    config = _relay_config(args, http, agents, groups)
    relay = Relay(config)
    secrets = [g.token for g in groups] + [t.token for t in config.tunnels if t.token is not None]
    admin, relay.inspector = admin_server(
        args,
        relay.metrics,
        secrets,
        info={"tunnels": [t.name for t in config.tunnels]},
        replayer=ReplayClient(lambda: relay.http_address),
    )
    # A CA made by `rtunnel cert` beside the certificate is what agents need for --ca.
    ca_file = "ca.pem" if args.tls_cert and Path(args.tls_cert).with_name("ca.pem").is_file() else None
    return RelayRunner(relay, admin, token_file=args.token_file, grace=args.grace, ca_file=ca_file)


def _relay_config(
    args: argparse.Namespace,
    http: tuple[str, int],
    agents: tuple[str, int],
    groups: Sequence[TokenGroup],
) -> RelayConfig:
    from ..relay.server import RelayConfig

    return RelayConfig(
        http_host=http[0],
        http_port=http[1],
        agents_host=agents[0],
        agents_port=agents[1],
        token_groups=tuple(groups),
        ssl_context=server_tls_context(args.tls_cert, args.tls_key),
        agent_wait=args.agent_wait,
        ping_interval=args.ping_interval,
        dead_timeout=args.dead_timeout,
        http_limits=_http_limits(args),
        stall_timeout=args.stall_timeout or None,
        auth_fail_limit=args.auth_fail_limit,
        auth_fail_window=args.auth_fail_window,
        tunnels=_tunnels(args, groups),
        proxy_protocol=args.proxy_protocol,
        agents_proxy_protocol=args.agents_proxy_protocol,
        trusted_proxies=_trusted_proxies(args.trusted_proxy),
    )


def _http_limits(args: argparse.Namespace) -> HttpLimits:
    """The limits options, where 0 means none."""
    from ..relay.limits import HttpLimits

    return HttpLimits(
        max_head_size=args.max_head_size or 1 << 30,
        max_header_count=args.max_headers or 1 << 30,
        head_timeout=args.head_timeout or math.inf,
        idle_timeout=args.idle_timeout or math.inf,
        body_timeout=args.body_timeout or math.inf,
        send_timeout=args.stall_timeout or math.inf,
        max_body_size=args.max_body_size or None,
        max_connections=args.max_connections or None,
        max_connections_per_ip=args.max_connections_per_ip or None,
        max_exchanges_per_ip=args.max_exchanges_per_ip or None,
        max_buffered_bytes=args.max_buffered or None,
    )


def _trusted_proxies(cidrs: Sequence[str]) -> tuple[str, ...]:
    import ipaddress

    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            raise ConfigError(
                f"--trusted-proxy: {cidr!r} is not an address or network (e.g. 10.0.0.0/8)"
            ) from None
    return tuple(cidrs)


def _tunnel_specs(options: Sequence[str]) -> list[TunnelSpec]:
    """`--tunnel NAME=host:H,prefix:/P,keep-prefix` (repeatable; one NAME given twice adds to it)."""
    specs: dict[str, TunnelSpec] = {}
    for text in options:
        name, _, rules = text.partition("=")
        if not TUNNEL_NAME.fullmatch(name):
            raise ConfigError(f"--tunnel {text!r}: NAME is letters, digits, '.', '_', '-' (at most 63)")
        token = os.environ.get(tunnel_token_env(name)) or None
        if token is not None and not is_token_text(token):
            raise ConfigError(f"${tunnel_token_env(name)}: the token must be printable ASCII without spaces")
        spec = specs.get(name) or TunnelSpec(name, token)
        for rule in filter(None, (item.strip() for item in rules.split(","))):
            kind, _, value = rule.partition(":")
            if kind == "host" and value:
                spec = dataclasses.replace(spec, hosts=(*spec.hosts, value))
            elif kind == "prefix" and value.startswith("/") and spec.path_prefix in (None, value):
                spec = dataclasses.replace(spec, path_prefix=value)
            elif rule == "keep-prefix":
                spec = dataclasses.replace(spec, strip_prefix=False)
            else:
                raise ConfigError(
                    f"--tunnel {text!r}: bad rule {rule!r} (host:HOSTNAME, prefix:/PATH or keep-prefix; "
                    "one prefix per tunnel)"
                )
        specs[name] = spec
    return list(specs.values())


def _tunnels(args: argparse.Namespace, relay_groups: Sequence[TokenGroup]) -> tuple[Tunnel, ...]:
    """The relay's named tunnels: --tunnel options if given (flags win), else the file's [[tunnel]] tables."""
    from ..relay.registry import Tunnel, TunnelRouter

    specs = _tunnel_specs(args.tunnel) if args.tunnel else list(getattr(args, "tunnels", ()))
    tunnels = tuple(
        Tunnel(s.name, s.hosts, s.path_prefix, s.strip_prefix, None if s.token is None else s.token.encode())
        for s in specs
    )
    tokens = [t.token for t in tunnels if t.token is not None]
    if len(set(tokens)) != len(tokens) or set(tokens) & {g.token for g in relay_groups}:
        # A token must say which tunnel its agent serves: shared tokens would blur that.
        raise ConfigError("--tunnel: every tunnel token must differ from the others and from --token")
    prefixes = [t.path_prefix.rstrip("/") for t in tunnels if t.path_prefix is not None and not t.hosts]
    if len(set(prefixes)) != len(prefixes):
        raise ConfigError("--tunnel: two tunnels route the same path prefix")
    try:
        TunnelRouter(0, tunnels)  # checks names and hosts are unique
    except ValueError as exc:
        raise ConfigError(f"--tunnel: {exc}") from None
    return tunnels


class RelayRunner:
    """A relay and its admin endpoint, ready to run: `await runner()` until cancelled (`task_status` gets
    the `Listening` once both listeners are bound); `drain()` is SIGTERM's graceful stop."""

    def __init__(
        self,
        relay: Relay,
        admin: AdminServer | None,
        *,
        token_file: str | None,
        grace: float,
        ca_file: str | None,
    ) -> None:
        self.relay = relay
        self._admin = admin
        self._token_file = token_file
        self._grace = grace
        self._ca_file = ca_file

    async def __call__(self, *, task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reload_tokens_on_sighup)
            if self._admin is not None:
                await nursery.start(self._admin.run)
            async with trio.open_nursery() as relay_nursery:
                task_status.started(await relay_nursery.start(self._serve_and_tell))
            nursery.cancel_scope.cancel()

    async def drain(self) -> None:
        # SIGTERM: stop accepting, let the exchanges in progress finish within the grace period.
        self.relay.metrics.draining = True  # /readyz turns 503 so load balancers stop sending
        await self.relay.drain(self._grace)

    async def _serve_and_tell(self, *, task_status: trio.TaskStatus[Listening]) -> None:
        relay, config = self.relay, self.relay.config
        tls = config.ssl_context is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            assert relay.http_address is not None and relay.agents_address is not None
            agents = relay.agents_address
            task_status.started(Listening(relay.http_address, (agents[0], agents[1]), tls))
            for line in connect_hints(
                relay.http_address,
                relay.agents_address,
                tls=tls,
                token_set=bool(config.token_groups) or any(t.token is not None for t in config.tunnels),
                ca_file=self._ca_file,
                tunnels=[t.name for t in config.tunnels],
            ):
                log.info("%s", line)

    async def _reload_tokens_on_sighup(self) -> None:
        """SIGHUP: read --token-file again; revoked tokens' agents are disconnected. A bad file changes nothing.
        (Without a token file there is nothing to reload, but SIGHUP must not kill the relay either.)"""
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                if self._token_file is None:
                    log.info("SIGHUP: no --token-file to reload")
                    continue
                try:
                    groups = read_token_file(self._token_file)
                except ConfigError as exc:
                    log.error("SIGHUP: keeping the current tokens: %s", exc)
                    continue
                self.relay.reload_tokens(tuple(groups))
                if self.relay.inspector is not None:  # a new token is as secret as the old ones
                    self.relay.inspector.redactor.add_secrets(group.token for group in groups)
