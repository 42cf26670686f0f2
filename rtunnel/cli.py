"""Command line: `rtunnel serve`, `rtunnel dial`, `rtunnel status`, `rtunnel demo`.

Configuration errors exit with status 2 and one line on stderr; SIGINT/SIGTERM shut down cleanly with status 0.
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
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from . import __version__
from .admin import DEFAULT_ADMIN, AdminServer, parse_admin_address, run_status
from .adminauth import is_loopback
from .config import (
    ConfigError,
    TokenGroup,
    client_tls_context,
    load_token,
    load_tokens,
    parse_address,
    read_token_file,
    server_tls_context,
)
from .configfile import TUNNEL_NAME, TunnelSpec, describe_error, tunnel_token_env
from .configfile import parse_args as parse_args_with_config
from .dashboard import Dashboard, Replayer
from .inspector import DEFAULT_MAX_BODY, Inspector
from .logs import LOG_FORMATS, flush_periodically
from .logs import setup as setup_logging
from .redact import DEFAULT_WORDS, Redactor

if TYPE_CHECKING:
    from .metrics import Metrics
    from .registry import Tunnel
    from .relay import Relay

log = logging.getLogger("rtunnel")

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the contract for bad configuration), not argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rtunnel", description="Reverse HTTP tunnel over one outbound WebSocket.")
    parser.add_argument("--version", action="version", version=f"rtunnel {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format", default="text", choices=LOG_FORMATS, help="text (default) or json: one object a line"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,dial,status,demo}")

    serve = commands.add_parser("serve", help="run the relay (where HTTP clients connect)")
    serve.add_argument(
        "--http", default="127.0.0.1:8080", metavar="HOST:PORT", help="where HTTP clients connect"
    )
    serve.add_argument("--agents", default="127.0.0.1:8443", metavar="HOST:PORT", help="where agents connect")
    _token_options(serve)
    serve.add_argument("--tls-cert", metavar="FILE", help="certificate chain (PEM) for wss:// on --agents")
    serve.add_argument("--tls-key", metavar="FILE", help="private key (PEM) for --tls-cert")
    serve.add_argument(
        "--agent-wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a request waits for an agent before 503 (default 10)",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight exchanges may finish (default 30)",
    )
    serve.add_argument(
        "--tunnel",
        action="append",
        default=[],
        metavar="NAME=RULE[,RULE]",
        help="a named tunnel (repeatable); RULE: host:HOSTNAME, prefix:/PATH, keep-prefix "
        "(its own token: $RTUNNEL_TUNNEL_<NAME>_TOKEN)",
    )
    _liveness_options(serve)
    _limit_options(serve)
    _config_and_admin_options(serve)

    dial = commands.add_parser("dial", help="run the agent (beside the service)")
    dial.add_argument("relay_urls", nargs="+", metavar="RELAY_URL", help="ws://HOST:PORT or wss://HOST:PORT")
    dial.add_argument(
        "--upstream", required=True, metavar="URL", help="the local service, e.g. http://127.0.0.1:5000"
    )
    _token_options(dial)
    dial.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="'METHOD PATH'",
        help="forward only matching requests (repeatable; PATH glob: * one segment, ** any)",
    )
    dial.add_argument("--ca", metavar="FILE", help="CA bundle to verify a wss:// relay (default: system CAs)")
    dial.add_argument(
        "--insecure", action="store_true", help="do not verify the relay's certificate (unsafe)"
    )
    dial.add_argument("--connect-timeout", type=_positive, default=10.0, metavar="SECONDS")
    dial.add_argument(
        "--response-timeout",
        type=_positive,
        default=60.0,
        metavar="SECONDS",
        help="time the upstream has to start answering before 504 (default 60)",
    )
    dial.add_argument("--backoff-initial", type=_positive, default=0.5, metavar="SECONDS")
    dial.add_argument("--backoff-cap", type=_positive, default=30.0, metavar="SECONDS")
    dial.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight exchanges may finish (default 30)",
    )
    dial.add_argument(
        "--max-streams",
        type=_count,
        default=256,
        metavar="N",
        help="exchanges the relay may run through this agent at once (its MAX_CONCURRENT_STREAMS; default 256)",
    )
    dial.add_argument("--tunnel", metavar="NAME", help="the named tunnel of the relay this agent serves")
    _liveness_options(dial)
    _config_and_admin_options(dial)

    status = commands.add_parser("status", help="show the agents (or relays) of a running relay (or agent)")
    status.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="URL",
        help=f"the admin endpoint of `serve --admin` or `dial --admin` (default {DEFAULT_ADMIN})",
    )
    status.add_argument(
        "--admin-token", metavar="TOKEN", help="its --admin-token (or set RTUNNEL_ADMIN_TOKEN)"
    )

    commands.add_parser("demo", help="start a relay, an agent and a sample service on localhost")
    return parser


_SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _size(text: str) -> int:
    """A byte count, optionally with a K/M/G suffix (powers of 1024); 0 means "no limit"."""
    number, suffix = text.strip(), ""
    if number[-1:].lower() in ("k", "m", "g"):
        number, suffix = number[:-1], number[-1].lower()
    try:
        value = int(number) * _SIZE_SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 65536, 64K, 10M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _count(text: str) -> int:
    """A non-negative integer; 0 means "no limit"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _limit_options(parser: argparse.ArgumentParser) -> None:
    """The relay's abuse limits (README, "Security model"). Defaults come from HttpLimits and RelayConfig."""
    from .relay import RelayConfig
    from .relay_http import HttpLimits

    limits, relay = HttpLimits(), RelayConfig()
    group = parser.add_argument_group("limits (0 disables a limit)")

    def add(option: str, kind: Callable[[str], Any], default: Any, unit: str, what: str) -> None:
        shown = "none" if default is None else f"{default:g}" if isinstance(default, float) else default
        group.add_argument(
            option, type=kind, default=default or 0, metavar=unit, help=f"{what} (default {shown})"
        )

    add("--max-head-size", _size, limits.max_head_size, "BYTES", "request line + headers, else 431")
    add("--max-headers", _count, limits.max_header_count, "N", "header fields per request, else 431")
    add("--max-body-size", _size, limits.max_body_size, "BYTES", "request body, else 413")
    add("--head-timeout", float, limits.head_timeout, "SECONDS", "to receive a request head, else 408")
    add("--idle-timeout", float, limits.idle_timeout, "SECONDS", "keep-alive connection without a request")
    add(
        "--body-timeout",
        float,
        limits.body_timeout,
        "SECONDS",
        "a request body that stops arriving, else 408",
    )
    add("--max-connections", _count, limits.max_connections, "N", "client connections in total, else 503")
    add(
        "--max-connections-per-ip",
        _count,
        limits.max_connections_per_ip,
        "N",
        "client connections from one address, else 503",
    )
    add(
        "--max-exchanges-per-ip",
        _count,
        limits.max_exchanges_per_ip,
        "N",
        "requests in progress from one address, else 429",
    )
    add(
        "--max-buffered",
        _size,
        limits.max_buffered_bytes,
        "BYTES",
        "stream data buffered across all agents; beyond it new requests get 503",
    )
    add(
        "--stall-timeout",
        float,
        relay.stall_timeout,
        "SECONDS",
        "reset a stream whose agent grants no flow-control window this long",
    )
    add("--auth-fail-limit", _count, relay.auth_fail_limit, "N", "failed agent logins per address, then 429")
    add("--auth-fail-window", float, relay.auth_fail_window, "SECONDS", "window of --auth-fail-limit")


def _token_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("authentication")
    group.add_argument("--token", help="shared secret (or set RTUNNEL_TOKEN)")
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the token from FILE (serve: several, one per line, '#' comments; re-read on SIGHUP)",
    )


def _config_and_admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file setting any of these options (flags given here win)"
    )
    parser.add_argument(
        "--access-log",
        default="on",
        choices=["on", "off"],
        help="one line per exchange at level info (default on)",
    )
    parser.add_argument(
        "--admin",
        metavar="[HOST:]PORT",
        help="serve the dashboard, /healthz /readyz /metrics /status.json here (host default 127.0.0.1; "
        "off by default)",
    )
    parser.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help="require this token (Bearer, or the login form) on every admin path but /healthz and /readyz "
        "(or set RTUNNEL_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--inspect",
        type=_count,
        default=0,
        metavar="N",
        help="keep the last N exchanges for the inspector page (default 0: off; needs --admin)",
    )
    parser.add_argument(
        "--inspect-max-body",
        type=_size,
        default=DEFAULT_MAX_BODY,
        metavar="BYTES",
        help="capture at most this much of each body (default 64K)",
    )
    parser.add_argument(
        "--inspect-redact",
        metavar="WORD[,WORD]",
        default=",".join(DEFAULT_WORDS),
        help="redact headers, query parameters and JSON fields whose name contains one of these words "
        f"(default {','.join(DEFAULT_WORDS)}; Authorization, Cookie and the tokens always are)",
    )


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


async def _run_with_admin(admin: AdminServer | None, run: Callable[[], Awaitable[None]]) -> None:
    if admin is None:
        await run()
        return
    async with trio.open_nursery() as nursery:
        await nursery.start(admin.run)
        await run()
        nursery.cancel_scope.cancel()


def _liveness_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ping-interval", type=_positive, default=5.0, metavar="SECONDS")
    parser.add_argument(
        "--dead-timeout",
        type=_positive,
        default=20.0,
        metavar="SECONDS",
        help="declare the link dead after this long without any byte from the peer (default 20)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_args_with_config(parser, argv)
    except ConfigError as exc:
        command = getattr(exc, "command", None)
        print(f"rtunnel{' ' + command if command else ''}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(args.log_level, args.log_format, access=getattr(args, "access_log", "on") == "on")
    if args.command == "status":
        return run_status(args.admin, args.admin_token)
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
        return trio.run(_until_signal, runner)
    except KeyboardInterrupt:
        return 0


def _serve_runner(args: argparse.Namespace) -> Callable[[], Awaitable[None]]:
    from .relay import Relay, RelayConfig
    from .relay_http import HttpLimits

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
    )
    relay = Relay(config)
    token_file = args.token_file
    from .replay import ReplayClient

    secrets = [g.token for g in groups] + [t.token for t in config.tunnels if t.token is not None]
    admin, relay.inspector = _admin_server(
        args,
        relay.metrics,
        secrets,
        info={"tunnels": [t.name for t in config.tunnels]},
        replayer=ReplayClient(lambda: relay.http_address),
    )
    grace = args.grace

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_reload_tokens_on_sighup, relay, token_file)
            await _run_with_admin(admin, relay.run)
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
    from .registry import Tunnel, TunnelRouter

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


def _dial_runner(args: argparse.Namespace) -> Callable[[], Awaitable[None]]:
    from protocol import Settings

    from . import transport
    from .agent import Agent, AgentConfig, Connector
    from .agent_http import ExchangeHandler
    from .allowlist import Allowlist, AllowRuleError
    from .relay import FRAME_SIZE, STREAM_WINDOW, TUNNEL_HEADER
    from .transport import parse_relay_url

    for url in args.relay_urls:
        try:
            parse_relay_url(url)
        except ValueError as exc:
            raise ConfigError(f"relay URL {url!r}: {exc}") from None
    try:
        allowlist = Allowlist.parse(args.allow)
    except AllowRuleError as exc:
        raise ConfigError(f"--allow: {exc}") from None
    token = load_token(args.token, args.token_file)
    needs_tls = any(url.startswith("wss://") for url in args.relay_urls)
    if args.ca and not needs_tls:
        raise ConfigError("--ca only applies to wss:// relay URLs")
    ssl_context = client_tls_context(args.ca, args.insecure) if needs_tls else None
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
    info = {"allowlist": [rule.text for rule in allowlist.rules], "upstream": args.upstream}
    admin, handler.inspector = _admin_server(
        args, agent.metrics, [token.encode()] if token else [], info=info
    )
    grace = args.grace

    async def run() -> None:
        if allowlist.unrestricted:
            log.warning("no --allow rule: every request is forwarded to %s (unrestricted)", args.upstream)
        if args.insecure:
            log.warning(
                "--insecure: the relay's certificate is NOT verified; anyone on the path can impersonate it"
            )
        if token is None:
            log.warning("no token set: the relay must be running without authentication")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(handler.run)  # expires idle upstream connections
                await _run_with_admin(admin, agent.run)
        finally:
            with trio.CancelScope(shield=True):
                await handler.aclose()

    async def drain() -> None:
        # SIGTERM: stop taking new exchanges (GOAWAY), let the running ones finish within the grace period.
        agent.metrics.draining = True
        await agent.drain(grace)

    run.drain = drain  # type: ignore[attr-defined]
    return run


async def _until_signal(runner: Callable[[], Awaitable[None]]) -> int:
    status = 0
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
        except* OSError as group:
            print(f"rtunnel: error: {group.exceptions[0]}", file=sys.stderr)
            status = EXIT_RUNTIME
    return status
