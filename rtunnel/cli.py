"""Command line: `rtunnel serve`, `rtunnel dial`, `rtunnel demo`.

Configuration errors exit with status 2 and one line on stderr; SIGINT/SIGTERM shut down cleanly with status 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

from . import __version__
from .config import (
    ConfigError,
    client_tls_context,
    load_token,
    parse_address,
    server_tls_context,
)

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtunnel", description="Reverse HTTP tunnel over one outbound WebSocket."
    )
    parser.add_argument("--version", action="version", version=f"rtunnel {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,dial,demo}")

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
    _liveness_options(serve)

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
    _liveness_options(dial)

    commands.add_parser("demo", help="start a relay, an agent and a sample service on localhost")
    return parser


def _token_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("authentication")
    group.add_argument("--token", help="shared secret (or set RTUNNEL_TOKEN)")
    group.add_argument("--token-file", metavar="FILE", help="read the token from FILE")


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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "serve":
            runner = _serve_runner(args)
        elif args.command == "dial":
            runner = _dial_runner(args)
        else:
            from .demo import run_demo

            runner = run_demo
    except ConfigError as exc:
        print(f"rtunnel {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return trio.run(_until_signal, runner)
    except KeyboardInterrupt:
        return 0


def _serve_runner(args: argparse.Namespace) -> Callable[[], Awaitable[None]]:
    from .relay import Relay, RelayConfig

    http_host, http_port = parse_address(args.http, "--http")
    agents_host, agents_port = parse_address(args.agents, "--agents")
    token = load_token(args.token, args.token_file)
    if args.agent_wait < 0:
        raise ConfigError("--agent-wait must not be negative")
    config = RelayConfig(
        http_host=http_host,
        http_port=http_port,
        agents_host=agents_host,
        agents_port=agents_port,
        tokens=(token.encode(),) if token else (),
        ssl_context=server_tls_context(args.tls_cert, args.tls_key),
        agent_wait=args.agent_wait,
        ping_interval=args.ping_interval,
        dead_timeout=args.dead_timeout,
    )
    relay = Relay(config)

    async def run() -> None:
        await relay.run()

    return run


def _dial_runner(args: argparse.Namespace) -> Callable[[], Awaitable[None]]:
    from .agent import Agent, AgentConfig
    from .agent_http import ExchangeHandler
    from .allowlist import Allowlist, AllowRuleError
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
    )
    agent = Agent(config, handler)
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
                await agent.run()
        finally:
            with trio.CancelScope(shield=True):
                await handler.aclose()

    async def drain() -> None:
        # SIGTERM: stop taking new exchanges (GOAWAY), let the running ones finish within the grace period.
        agent.goaway_all()
        with trio.move_on_after(grace):
            await agent.wait_idle()

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
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    drain = getattr(runner, "drain", None)
                    if drain is not None:
                        await drain()
                    nursery.cancel_scope.cancel()
                    break
        except* OSError as group:
            print(f"rtunnel: error: {group.exceptions[0]}", file=sys.stderr)
            status = EXIT_RUNTIME
    return status
