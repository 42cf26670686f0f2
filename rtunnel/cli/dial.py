"""`rtunnel dial`: its options, and the agent they describe (in front of an upstream URL or an in-process app),
checked and built before trio starts.

`agent_runner` is what both `rtunnel dial` (with signal handling around it, commands.py) and `rtunnel.dial`
(api.py) run.
"""

from __future__ import annotations

import argparse
import functools
import logging
from typing import TYPE_CHECKING

import trio

from ..config import ConfigError, client_tls_context, load_token
from .common import admin_options, admin_server, grace_option, liveness_options, token_options
from .configfile import TUNNEL_NAME
from .values import count, count_positive, positive, upstream_url

if TYPE_CHECKING:
    import ssl

    from ..agent.allowlist import Allowlist
    from ..agent.apps.handler import AppService
    from ..agent.dialer import Agent, AgentConfig, Connector
    from ..agent.exchange import ExchangeHandler
    from ..ops.admin import AdminServer

__all__ = ["AgentRunner", "add_dial_options", "agent_runner"]

log = logging.getLogger("rtunnel")


def add_dial_options(dial: argparse.ArgumentParser) -> None:
    dial.add_argument(
        "relay_urls",
        nargs="+",
        metavar="RELAY_URL",
        help="ws://HOST:PORT or wss://HOST:PORT (the relay's --agents)",
    )
    dial.add_argument(
        "--upstream",
        type=upstream_url,
        metavar="URL",
        help="the local service: http://HOST:PORT, HOST:PORT or PORT (then 127.0.0.1); required unless --app",
    )
    _app_options(dial)
    token_options(dial)
    dial.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="'METHOD PATH'",
        help="forward only matching requests (repeatable; PATH glob: * one segment, ** any; default: all)",
    )
    dial.add_argument("--ca", metavar="FILE", help="CA bundle to verify a wss:// relay (default: system CAs)")
    dial.add_argument(
        "--insecure", action="store_true", help="do not verify the relay's certificate (unsafe)"
    )
    _timeout_options(dial)
    grace_option(dial)
    dial.add_argument(
        "--max-streams",
        type=count,
        default=256,
        metavar="N",
        help="exchanges the relay may run through this agent at once (its MAX_CONCURRENT_STREAMS; default 256)",
    )
    dial.add_argument(
        "--tunnel", metavar="NAME", help="the named tunnel of the relay this agent serves (default none)"
    )
    liveness_options(dial)
    admin_options(dial)


def _timeout_options(parser: argparse.ArgumentParser) -> None:
    """How long to wait for the relay and the upstream, and between attempts to reach the relay."""
    parser.add_argument(
        "--connect-timeout",
        type=positive,
        default=10.0,
        metavar="SECONDS",
        help="time to connect to the relay, and to the upstream",
    )
    parser.add_argument(
        "--response-timeout",
        type=positive,
        default=60.0,
        metavar="SECONDS",
        help="time the upstream has to start answering before 504 (default 60)",
    )
    parser.add_argument(
        "--backoff-initial",
        type=positive,
        default=0.5,
        metavar="SECONDS",
        help="first reconnect delay (doubling, with full jitter, up to --backoff-cap)",
    )
    parser.add_argument(
        "--backoff-cap", type=positive, default=30.0, metavar="SECONDS", help="longest reconnect delay"
    )


def _app_options(parser: argparse.ArgumentParser) -> None:
    """`dial --app`: run a WSGI or ASGI app in the agent itself (rtunnel.agent.apps), uvicorn's option names."""
    group = parser.add_argument_group("in-process application (instead of --upstream)")
    group.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="a WSGI or ASGI app to run in the agent, e.g. myproject.web:app; required unless --upstream",
    )
    group.add_argument(
        "--app-dir", default=".", metavar="DIR", help="put DIR first on sys.path to import --app"
    )
    group.add_argument("--factory", action="store_true", help="ATTR is a function returning the app")
    group.add_argument(
        "--interface",
        default="auto",
        choices=["auto", "asgi", "wsgi"],
        help="auto tells them apart as uvicorn does",
    )
    group.add_argument(
        "--app-threads",
        type=count_positive,
        default=40,
        metavar="N",
        help="WSGI: worker threads running the app at once",
    )
    group.add_argument(
        "--lifespan",
        default="auto",
        choices=["auto", "on", "off"],
        help="ASGI lifespan: start-up before dialing, shutdown after the drain",
    )


def agent_runner(args: argparse.Namespace) -> AgentRunner:
    """The agent of `dial`'s options (a bad one raises ConfigError), with its handler and admin endpoint."""
    from ..agent.allowlist import Allowlist, AllowRuleError
    from ..agent.dialer import Agent

    _check_relay_urls(args.relay_urls)
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
    handler = _handler(args, allowlist, service)
    config = _agent_config(args, token, ssl_context)
    agent = Agent(config, handler, connect=_connector(args.tunnel))
    handler.on_exchange = agent.metrics.record_exchange
    agent.metrics.pooled_connections = lambda: handler.pool.idle_count
    target = args.upstream if service is None else f"the app {args.app}"
    info = {"allowlist": [rule.text for rule in allowlist.rules], "upstream": target}
    admin, handler.inspector = admin_server(args, agent.metrics, [token.encode()] if token else [], info=info)
    warnings = []
    if allowlist.unrestricted:
        warnings.append(f"no --allow rule: every request is forwarded to {target} (unrestricted)")
    if args.insecure:
        warnings.append(
            "--insecure: the relay's certificate is NOT verified; anyone on the path can impersonate it"
        )
    if token is None:
        warnings.append("no token set: the relay must be running without authentication")
    return AgentRunner(agent, handler, service, admin, grace=args.grace, warnings=warnings)


def _check_relay_urls(urls: list[str]) -> None:
    from ..link.transport import parse_relay_url

    for url in urls:
        if "://" not in url:
            raise ConfigError(f"relay URL {url!r} has no scheme: use ws://{url} or wss://{url}")
        try:
            parse_relay_url(url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _handler(args: argparse.Namespace, allowlist: Allowlist, service: AppService | None) -> ExchangeHandler:
    """What answers the relay's requests: the in-process app, or the --upstream service."""
    from ..agent.apps.handler import AppExchangeHandler
    from ..agent.exchange import ExchangeHandler

    if service is not None:
        return AppExchangeHandler(service, allowlist, response_timeout=args.response_timeout)
    try:
        return ExchangeHandler(
            args.upstream,
            allowlist,
            connect_timeout=args.connect_timeout,
            response_timeout=args.response_timeout,
        )
    except ValueError as exc:
        raise ConfigError(f"--upstream: {exc}") from None


def _agent_config(
    args: argparse.Namespace, token: str | None, ssl_context: ssl.SSLContext | None
) -> AgentConfig:
    from protocol import Settings

    from ..agent.dialer import AgentConfig
    from ..relay.server import FRAME_SIZE, STREAM_WINDOW

    return AgentConfig(
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


def _connector(tunnel: str | None) -> Connector:
    """How the agent opens its links: with the header naming its tunnel, if it serves one."""
    from ..link import transport
    from ..relay.server import TUNNEL_HEADER

    if tunnel is None:
        return transport.connect
    if not TUNNEL_NAME.fullmatch(tunnel):
        raise ConfigError(f"--tunnel {tunnel!r}: letters, digits, '.', '_', '-' (at most 63)")
    return functools.partial(transport.connect, extra_headers=((TUNNEL_HEADER, tunnel),))


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


class AgentRunner:
    """An agent with its handler, app and admin endpoint, ready to run: `await runner()` until cancelled
    (`task_status` once the first link is up); `drain()` is SIGTERM's graceful stop."""

    def __init__(
        self,
        agent: Agent,
        handler: ExchangeHandler,
        service: AppService | None,
        admin: AdminServer | None,
        *,
        grace: float,
        warnings: list[str],
    ) -> None:
        self.agent = agent
        self._handler = handler
        self._service = service
        self._admin = admin
        self._grace = grace
        self._warnings = warnings  # logged when it starts, not when it is built

    async def __call__(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for warning in self._warnings:
            log.warning("%s", warning)
        try:
            async with trio.open_nursery() as nursery:
                if self._service is not None:
                    # ASGI lifespan start-up completes before the agent dials: no request meets an unready app.
                    await nursery.start(self._service.run)
                nursery.start_soon(self._handler.run)  # expires idle upstream connections
                if self._admin is not None:
                    await nursery.start(self._admin.run)
                nursery.start_soon(self.agent.run)
                await self.agent.wait_connected()
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._handler.aclose()

    async def drain(self) -> None:
        # SIGTERM: stop taking new exchanges (GOAWAY), let the running ones finish within the grace period.
        self.agent.metrics.draining = True
        await self.agent.drain(self._grace)
        if self._service is not None:
            await self._service.shutdown()  # ASGI lifespan shutdown, once the exchanges are done
