"""Command line: `rtunnel serve`, `dial`, `status`, `demo`, `cert`, `token`, `completion` (parser: parse.py).

Configuration errors exit with status 2 and one line on stderr; a failure while starting (a port in use, say)
exits with status 1 and one line; SIGINT/SIGTERM shut down cleanly with status 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..config import (
    ConfigError,
    TokenGroup,
    client_tls_context,
    load_token,
    load_tokens,
    parse_address,
    read_token_file,
    server_tls_context,
)
from ..ops.admin import AdminServer, parse_admin_address, run_status
from ..ops.adminauth import is_loopback
from ..ops.dashboard import Dashboard, Replayer
from ..ops.inspector import Inspector
from ..ops.logs import flush_periodically
from ..ops.logs import setup as setup_logging
from ..ops.redact import Redactor
from ..startup import StartupError, connect_hints, describe_os_error
from .configfile import TUNNEL_NAME, TunnelSpec, describe_error, tunnel_token_env
from .configfile import parse_args as parse_args_with_config
from .parse import EXIT_CONFIG, build_parser

if TYPE_CHECKING:
    from ..agent.apps.handler import AppService
    from ..ops.metrics import Metrics
    from ..relay.registry import Tunnel
    from ..relay.server import Relay

__all__ = ["EXIT_CONFIG", "EXIT_RUNTIME", "build_parser", "main"]

log = logging.getLogger("rtunnel")

EXIT_RUNTIME = 1


class Runner(Protocol):
    """What `serve` and `dial` run (rtunnel.api too): until cancelled; `task_status` once up."""

    def __call__(self, *, task_status: trio.TaskStatus[Any] = ...) -> Awaitable[None]: ...


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


def _admin_server(
    args: argparse.Namespace,
    metrics: Metrics,
    secrets: Sequence[bytes],
    *,
    info: dict[str, Any],
    replayer: Replayer | None = None,
) -> tuple[AdminServer | None, Inspector | None]:
    """The admin endpoint, and the inspector it shows (--inspect); refuses an inspector open to others."""
    token = args.admin_token or os.environ.get("RTUNNEL_ADMIN_TOKEN") or None
    if args.admin is None:
        if args.inspect or args.admin_token:
            raise ConfigError(f"{'--inspect' if args.inspect else '--admin-token'} needs --admin")
        return None, None
    host, port = parse_admin_address(args.admin)
    if token is not None:
        _check_admin_token(token)
    inspector = None
    if args.inspect:
        if token is None and not is_loopback(host):
            raise ConfigError(
                f"--inspect with --admin {args.admin} (not a loopback address) needs --admin-token or "
                "$RTUNNEL_ADMIN_TOKEN: captured requests would be open to anyone who can reach it"
            )
        words = [word.strip() for word in args.inspect_redact.split(",") if word.strip()]
        known = [*secrets, *([token.encode()] if token else [])]
        inspector = Inspector(
            args.inspect, max_body=args.inspect_max_body, redactor=Redactor(words, secrets=known)
        )
    dashboard = Dashboard(
        metrics,
        inspector=inspector,
        replayer=replayer if inspector is not None else None,
        info=info,
    )
    return AdminServer(metrics, host, port, token=token, dashboard=dashboard), inspector


def _check_admin_token(token: str) -> None:
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise ConfigError("admin token: printable ASCII without spaces")
    if len(token) < 16:
        raise ConfigError("admin token: at least 16 characters (e.g. `openssl rand -hex 16`)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_args_with_config(parser, argv)
    except ConfigError as exc:
        command = getattr(exc, "command", None)
        print(f"rtunnel{' ' + command if command else ''}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(args.log_level, args.log_format, access=getattr(args, "access_log", "on") == "on")
    if args.command in ("status", "cert", "token", "completion"):
        return _run_tool(parser, args)
    runner: Callable[[], Awaitable[None]]
    try:
        if args.command == "serve":
            runner = _serve_runner(args)
        elif args.command == "dial":
            runner = _dial_runner(args)
        else:
            from .demo import run_demo

            runner = run_demo
    except ConfigError as exc:
        print(f"rtunnel {args.command}: error: {describe_error(str(exc), args)}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return trio.run(_until_signal, runner, args.command)
    except KeyboardInterrupt:
        return 0


def _run_tool(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The commands that do one thing and exit."""
    if args.command == "status":
        return run_status(args.admin, args.admin_token)
    if args.command == "completion":
        import shtab

        print(shtab.complete(parser, shell=args.shell))
        return 0
    from . import certs

    if args.command == "token":
        print(certs.new_token())
        return 0
    try:
        lines = certs.make_relay_cert(args.host, Path(args.out), days=args.days)
    except (ConfigError, OSError) as exc:
        reason = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        print(f"rtunnel cert: error: {reason}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_RUNTIME
    print("\n".join(lines))
    return 0


def _serve_runner(args: argparse.Namespace) -> Runner:
    from ..relay.exchange import HttpLimits
    from ..relay.server import Relay, RelayConfig

    http_host, http_port = parse_address(args.http, "--http")
    agents_host, agents_port = parse_address(args.agents, "--agents")
    groups = load_tokens(args.token, args.token_file)
    if args.agent_wait < 0:
        raise ConfigError("--agent-wait must not be negative")
    for option in ("head_timeout", "idle_timeout", "body_timeout", "stall_timeout", "auth_fail_window"):
        if getattr(args, option) < 0:
            raise ConfigError(f"--{option.replace('_', '-')} must not be negative")
    if args.grace < 0:
        raise ConfigError("--grace must not be negative")
    config = RelayConfig(
        http_host=http_host,
        http_port=http_port,
        agents_host=agents_host,
        agents_port=agents_port,
        token_groups=tuple(groups),
        ssl_context=server_tls_context(args.tls_cert, args.tls_key),
        agent_wait=args.agent_wait,
        ping_interval=args.ping_interval,
        dead_timeout=args.dead_timeout,
        http_limits=HttpLimits(
            max_head_size=args.max_head_size or 1 << 30,
            max_header_count=args.max_headers or 1 << 30,
            head_timeout=args.head_timeout or math.inf,
            idle_timeout=args.idle_timeout or math.inf,
            body_timeout=args.body_timeout or math.inf,
            max_body_size=args.max_body_size or None,
            max_connections=args.max_connections or None,
            max_connections_per_ip=args.max_connections_per_ip or None,
            max_exchanges_per_ip=args.max_exchanges_per_ip or None,
            max_buffered_bytes=args.max_buffered or None,
        ),
        stall_timeout=args.stall_timeout or None,
        auth_fail_limit=args.auth_fail_limit,
        auth_fail_window=args.auth_fail_window,
        tunnels=_tunnels(args, groups),
        proxy_protocol=args.proxy_protocol,
        agents_proxy_protocol=args.agents_proxy_protocol,
        trusted_proxies=_trusted_proxies(args.trusted_proxy),
    )
    relay = Relay(config)
    token_file = args.token_file
    from ..ops.replay import ReplayClient

    secrets = [g.token for g in groups] + [t.token for t in config.tunnels if t.token is not None]
    admin, relay.inspector = _admin_server(
        args,
        relay.metrics,
        secrets,
        info={"tunnels": [t.name for t in config.tunnels]},
        replayer=ReplayClient(lambda: relay.http_address),
    )
    grace = args.grace
    # A CA made by `rtunnel cert` beside the certificate is what agents need for --ca.
    ca_file = "ca.pem" if args.tls_cert and Path(args.tls_cert).with_name("ca.pem").is_file() else None

    async def serve_and_tell(*, task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            assert relay.http_address is not None and relay.agents_address is not None
            agents = relay.agents_address
            task_status.started(
                Listening(relay.http_address, (agents[0], agents[1]), config.ssl_context is not None)
            )
            for line in connect_hints(
                relay.http_address,
                relay.agents_address,
                tls=config.ssl_context is not None,
                token_set=bool(groups) or any(t.token is not None for t in config.tunnels),
                ca_file=ca_file,
                tunnels=[t.name for t in config.tunnels],
            ):
                log.info("%s", line)

    async def run(*, task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_reload_tokens_on_sighup, relay, token_file)
            if admin is not None:
                await nursery.start(admin.run)
            async with trio.open_nursery() as relay_nursery:
                task_status.started(await relay_nursery.start(serve_and_tell))
            nursery.cancel_scope.cancel()

    async def drain() -> None:
        # SIGTERM: stop accepting, let the exchanges in progress finish within the grace period.
        relay.metrics.draining = True  # /readyz turns 503 so load balancers stop sending
        await relay.drain(grace)

    run.drain = drain  # type: ignore[attr-defined]
    return run


def _tunnel_specs(options: Sequence[str]) -> list[TunnelSpec]:
    """`--tunnel NAME=host:H,prefix:/P,keep-prefix` (repeatable; one NAME given twice adds to it)."""
    specs: dict[str, TunnelSpec] = {}
    for text in options:
        name, _, rules = text.partition("=")
        if not TUNNEL_NAME.fullmatch(name):
            raise ConfigError(f"--tunnel {text!r}: NAME is letters, digits, '.', '_', '-' (at most 63)")
        token = os.environ.get(tunnel_token_env(name)) or None
        if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
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


async def _reload_tokens_on_sighup(relay: Relay, token_file: str | None) -> None:
    """SIGHUP: read --token-file again; revoked tokens' agents are disconnected. A bad file changes nothing.
    (Without a token file there is nothing to reload, but SIGHUP must not kill the relay either.)"""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            if token_file is None:
                log.info("SIGHUP: no --token-file to reload")
                continue
            try:
                groups = read_token_file(token_file)
            except ConfigError as exc:
                log.error("SIGHUP: keeping the current tokens: %s", exc)
                continue
            relay.reload_tokens(tuple(groups))
            if relay.inspector is not None:  # a new token is as secret as the old ones
                relay.inspector.redactor.add_secrets(group.token for group in groups)


def _dial_runner(args: argparse.Namespace) -> Runner:
    from protocol import Settings

    from ..agent.allowlist import Allowlist, AllowRuleError
    from ..agent.apps.handler import AppExchangeHandler
    from ..agent.dialer import Agent, AgentConfig, Connector
    from ..agent.exchange import ExchangeHandler
    from ..link import transport
    from ..link.transport import parse_relay_url
    from ..relay.server import FRAME_SIZE, STREAM_WINDOW, TUNNEL_HEADER

    for url in args.relay_urls:
        if "://" not in url:
            raise ConfigError(f"relay URL {url!r} has no scheme: use ws://{url} or wss://{url}")
        try:
            parse_relay_url(url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    try:
        allowlist = Allowlist.parse(args.allow)
    except AllowRuleError as exc:
        raise ConfigError(f"--allow: {exc}") from None
    token = load_token(args.token, args.token_file)
    needs_tls = any(url.startswith("wss://") for url in args.relay_urls)
    if args.ca and not needs_tls:
        raise ConfigError("--ca only applies to wss:// relay URLs")
    ssl_context = client_tls_context(args.ca, args.insecure) if needs_tls else None
    service = _app_service(args)
    handler: ExchangeHandler
    if service is not None:
        handler = AppExchangeHandler(service, allowlist, response_timeout=args.response_timeout)
    else:
        try:
            handler = ExchangeHandler(
                args.upstream,
                allowlist,
                connect_timeout=args.connect_timeout,
                response_timeout=args.response_timeout,
            )
        except ValueError as exc:
            raise ConfigError(f"--upstream: {exc}") from None
    config = AgentConfig(
        relay_urls=args.relay_urls,
        token=token,
        ssl_context=ssl_context,
        backoff_initial=args.backoff_initial,
        backoff_cap=max(args.backoff_cap, args.backoff_initial),
        ping_interval=args.ping_interval,
        dead_timeout=args.dead_timeout,
        connect_timeout=args.connect_timeout,
        settings=Settings(
            max_concurrent_streams=args.max_streams,
            initial_stream_window=STREAM_WINDOW,
            max_frame_size=FRAME_SIZE,
        ),
        tunnel=args.tunnel,
    )
    connect: Connector = transport.connect
    if args.tunnel is not None:
        if not TUNNEL_NAME.fullmatch(args.tunnel):
            raise ConfigError(f"--tunnel {args.tunnel!r}: letters, digits, '.', '_', '-' (at most 63)")
        connect = functools.partial(transport.connect, extra_headers=((TUNNEL_HEADER, args.tunnel),))
    agent = Agent(config, handler, connect=connect)
    handler.on_exchange = agent.metrics.record_exchange
    agent.metrics.pooled_connections = lambda: handler.pool.idle_count
    target = args.upstream if service is None else f"the app {args.app}"
    info = {"allowlist": [rule.text for rule in allowlist.rules], "upstream": target}
    admin, handler.inspector = _admin_server(
        args, agent.metrics, [token.encode()] if token else [], info=info
    )
    grace = args.grace

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if allowlist.unrestricted:
            log.warning("no --allow rule: every request is forwarded to %s (unrestricted)", target)
        if args.insecure:
            log.warning(
                "--insecure: the relay's certificate is NOT verified; anyone on the path can impersonate it"
            )
        if token is None:
            log.warning("no token set: the relay must be running without authentication")
        try:
            async with trio.open_nursery() as nursery:
                if service is not None:
                    # ASGI lifespan start-up completes before the agent dials: no request meets an unready app.
                    await nursery.start(service.run)
                nursery.start_soon(handler.run)  # expires idle upstream connections
                if admin is not None:
                    await nursery.start(admin.run)
                nursery.start_soon(agent.run)
                await agent.wait_connected()
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await handler.aclose()

    async def drain() -> None:
        # SIGTERM: stop taking new exchanges (GOAWAY), let the running ones finish within the grace period.
        agent.metrics.draining = True
        await agent.drain(grace)
        if service is not None:
            await service.shutdown()  # ASGI lifespan shutdown, once the exchanges are done

    run.drain = drain  # type: ignore[attr-defined]
    return run


def _app_service(args: argparse.Namespace) -> AppService | None:
    """The app of `--app` (a MODULE:ATTR, or the object itself through the library API), or None."""
    from ..agent.apps.asgi import AsgiService
    from ..agent.apps.load import AppLoadError, LoadedApp, detect_interface, load_app
    from ..agent.apps.wsgi import WsgiService

    if (args.upstream is None) == (args.app is None):
        raise ConfigError("give exactly one of --upstream URL and --app MODULE:ATTR")
    if args.app is None:
        return None
    if isinstance(args.app, str):
        try:
            loaded = load_app(args.app, app_dir=args.app_dir, factory=args.factory, interface=args.interface)
        except AppLoadError as exc:
            if exc.__cause__ is not None:  # the app's own exception: its traceback, for --log-level debug
                log.debug("loading --app %s failed", args.app, exc_info=exc.__cause__)
            raise ConfigError(str(exc)) from None
    else:
        interface = detect_interface(args.app) if args.interface == "auto" else args.interface
        loaded = LoadedApp(args.app, interface, repr(args.app))
    log.info("serving the %s app %s in-process", loaded.interface.upper(), loaded.name)
    if loaded.interface == "asgi":
        return AsgiService(loaded.app, lifespan=args.lifespan, response_timeout=args.response_timeout)
    return WsgiService(loaded.app, threads=args.app_threads, response_timeout=args.response_timeout)


async def _until_signal(runner: Callable[[], Awaitable[None]], command: str | None = None) -> int:
    status = 0
    prog = f"rtunnel {command}" if command else "rtunnel"
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            async with trio.open_nursery() as nursery:

                async def run_then_stop() -> None:
                    await runner()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(run_then_stop)
                nursery.start_soon(flush_periodically)
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    drain = getattr(runner, "drain", None)
                    if drain is not None:
                        async with trio.open_nursery() as draining:

                            async def stop_on_second_signal() -> None:
                                # An impatient operator (a second Ctrl-C / SIGTERM) skips the grace period.
                                async for again in signals:
                                    log.warning("received %s again, stopping now", signal.Signals(again).name)
                                    draining.cancel_scope.cancel()

                            draining.start_soon(stop_on_second_signal)
                            await drain()
                            draining.cancel_scope.cancel()
                    nursery.cancel_scope.cancel()
                    break
        except* StartupError as group:
            print(f"{prog}: error: {_first(group)}", file=sys.stderr)
            status = EXIT_RUNTIME
        except* OSError as group:
            error = _first(group)
            assert isinstance(error, OSError)
            print(f"{prog}: error: {describe_os_error(error)}", file=sys.stderr)
            status = EXIT_RUNTIME
    return status


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of a (nested) exception group: what went wrong, without trio's wrapping."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
