"""`python -m rtunnel.conformance relay|agent ...`: see the package docstring."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio

from ..config import ConfigError, client_tls_context
from ..link import transport
from . import relay_cases, relay_exchanges
from .agent_cases import AgentTarget, StartFailed, run_agent_suite
from .relay_cases import RelayTarget
from .runner import Suite, leaf, report

RELAY_SUITE = Suite(relay_cases.suite, relay_exchanges.suite)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--timeout", type=float, default=5.0, help="seconds each case may take (default 5)")
    common.add_argument(
        "--only", metavar="TEXT", help="run only the cases whose title contains TEXT (or section)"
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", help="show what was sent and received for failures only"
    )
    parser = argparse.ArgumentParser(
        prog="python -m rtunnel.conformance", description="check an rtunnel.v1 relay or agent against SPEC.md"
    )
    sides = parser.add_subparsers(dest="side", required=True)
    relay = sides.add_parser("relay", parents=[common], help="dial a relay as a scripted agent")
    relay.add_argument("url", metavar="ws://HOST:PORT", help="where the relay accepts agents")
    relay.add_argument("--token", help="a token the relay accepts")
    relay.add_argument(
        "--http", metavar="http://HOST:PORT", help="the relay's HTTP side, for the cases that need a client"
    )
    relay.add_argument(
        "--ca", metavar="FILE", help="CA bundle to verify a wss:// relay (default: system CAs)"
    )
    relay.add_argument("--insecure", action="store_true", help="do not verify a wss:// relay's certificate")
    agent = sides.add_parser(
        "agent", parents=[common], help="be the relay (and the upstream) of an agent started by COMMAND"
    )
    agent.add_argument("--token", default="conformance-token", help="the token to fill in for {token}")
    agent.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND...",
        help="the agent to start; {url}, {token} and {upstream} in it are replaced",
    )
    return parser


async def _main(target: RelayTarget | AgentTarget, args: argparse.Namespace) -> bool:
    if isinstance(target, RelayTarget):
        outcomes = await RELAY_SUITE.run(target, timeout=target.timeout * 3, only=args.only)
    else:
        outcomes = await run_agent_suite(target, only=args.only)
    return report(outcomes, verbose=not args.quiet)


def _target(args: argparse.Namespace) -> RelayTarget | AgentTarget:
    """What to check, from the arguments; ValueError (one line) for bad ones."""
    if args.side == "agent":
        command = list(args.command)
        if command[:1] == ["--"]:
            command = command[1:]
        if not command:
            raise ValueError("give the agent's command after --")
        return AgentTarget(command, args.token, args.timeout)
    transport.parse_relay_url(args.url)
    try:
        tls = client_tls_context(args.ca, args.insecure) if args.url.startswith("wss:") else None
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return RelayTarget(args.url, args.token, args.http, args.timeout, tls)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        target = _target(args)
    except ValueError as exc:
        print(f"python -m rtunnel.conformance {args.side}: {exc}", file=sys.stderr)
        return 2
    failure = ""
    passed = interrupted = False
    try:
        passed = trio.run(_main, target, args)
    except* StartFailed as group:
        failure = str(leaf(group))
    except* KeyboardInterrupt:
        interrupted = True
    if interrupted:
        return 130
    if failure:
        print(f"python -m rtunnel.conformance agent: {failure}", file=sys.stderr)
        return 2
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
