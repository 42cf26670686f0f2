"""Command line: `rtunnel serve`, `dial`, `status`, `demo`, `cert`, `token`, `completion` (parser: parse.py;
the relay and the agent each command builds: serve.py, dial.py).

Configuration errors exit with status 2 and one line on stderr; a failure while starting (a port in use, say)
exits with status 1 and one line; SIGINT/SIGTERM shut down cleanly with status 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from ..config import ConfigError
from ..ops.admin import run_status
from ..ops.logs import flush_periodically
from ..ops.logs import setup as setup_logging
from ..startup import StartupError, describe_os_error
from .configfile import describe_error
from .configfile import parse_args as parse_args_with_config
from .dial import agent_runner
from .parse import EXIT_CONFIG, build_parser
from .serve import relay_runner

__all__ = ["EXIT_CONFIG", "EXIT_RUNTIME", "build_parser", "main"]

log = logging.getLogger("rtunnel")

EXIT_RUNTIME = 1


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
            runner = relay_runner(args)
        elif args.command == "dial":
            runner = agent_runner(args)
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
