"""The library API: `rtunnel.serve()` and `rtunnel.dial()` for trio programs.

Both take the command line's options by their names (`--max-streams` is `max_streams=`) with its defaults, run
until cancelled, and accept `task_status`, so `await nursery.start(rtunnel.serve, ...)` returns once the relay
listens and `await nursery.start(rtunnel.dial, ...)` once the agent's first link is up (after an ASGI app's
lifespan start-up). They build the relay and the agent exactly as `rtunnel serve` and `rtunnel dial` do (the
command line is this same code plus argument parsing and signal handling). Cancelling them stops at once,
with an app's lifespan shutdown still run; a bad option raises `ConfigError` with the command line's message.

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(rtunnel.serve, http="127.0.0.1:8080", agents="127.0.0.1:8443", token=t))
        await nursery.start(partial(rtunnel.dial, ["ws://127.0.0.1:8443"], app=my_asgi_app, token=t))
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import trio

from .cli.serve import Listening
from .config import ConfigError

__all__ = ["ConfigError", "Listening", "dial", "serve"]


async def serve(
    *,
    http: str = "127.0.0.1:8080",
    agents: str = "127.0.0.1:8443",
    token: str | None = None,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Run a relay (`rtunnel serve`): HTTP clients on `http`, agents on `agents`, until cancelled.

    `nursery.start` returns a `Listening` with the addresses bound (for ports given as 0)."""
    from .cli.serve import relay_runner

    args = _namespace("serve", [], dict(http=http, agents=agents, token=token, **options))
    await relay_runner(args)(task_status=task_status)


async def dial(
    relay_urls: str | Sequence[str],
    *,
    upstream: str | None = None,
    app: Any = None,
    token: str | None = None,
    allow: Sequence[str] = (),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Run an agent (`rtunnel dial`) until cancelled: requests to `upstream` ("http://host:port") or to `app`
    (a WSGI or ASGI app object, or "MODULE:ATTR"), only those `allow` permits ("METHOD PATH" rules)."""
    from .cli.dial import agent_runner

    urls = [relay_urls] if isinstance(relay_urls, str) else list(relay_urls)
    values = dict(upstream=upstream, app=app, token=token, allow=list(allow), **options)
    args = _namespace("dial", urls, values)
    await agent_runner(args)(task_status=task_status)


def _namespace(command: str, positional: list[str], values: dict[str, Any]) -> argparse.Namespace:
    """The command line's defaults for `command`, with `values` (option names as keyword names) set."""
    from .cli.parse import build_parser

    args = build_parser().parse_args([command, *positional])
    args.config_file, args.config_keys = None, {}
    if command == "serve":
        args.tunnels = ()
    for name, value in values.items():
        if not hasattr(args, name) or name in ("command", "config", "config_file", "config_keys"):
            raise TypeError(f"rtunnel.{command}() got an unknown option {name!r}")
        setattr(args, name, value)
    return args
