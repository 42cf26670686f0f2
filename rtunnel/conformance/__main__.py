"""`python -m rtunnel.conformance relay|agent ...`: see the package docstring."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio

from . import relay_cases, relay_exchanges
from .agent_cases import AgentTarget, StartFailed, run_agent_suite
from .relay_cases import RelayTarget
from .runner import Suite, leaf, report

RELAY_SUITE = Suite(relay_cases.suite, relay_exchanges.suite)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rtunnel.conformance", description="check an rtunnel.v1 relay or agent against SPEC.md"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds each case may take (default 5)")
    parser.add_argument(
        "--only", metavar="TEXT", help="run only the cases whose title contains TEXT (or section)"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="show what was sent and received for failures only"
    )
    sides = parser.add_subparsers(dest="side", required=True)
    relay = sides.add_parser("relay", help="dial a relay as a scripted agent")
    relay.add_argument("url", metavar="ws://HOST:PORT", help="where the relay accepts agents")
    relay.add_argument("--token", help="a token the relay accepts")
    relay.add_argument(
        "--http", metavar="http://HOST:PORT", help="the relay's HTTP side, for the cases that need a client"
    )
    agent = sides.add_parser("agent", help="be the relay (and the upstream) of an agent started by COMMAND")
    agent.add_argument("--token", default="conformance-token", help="the token to fill in for {token}")
    agent.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND...",
        help="the agent to start; {url}, {token} and {upstream} in it are replaced",
    )
    return parser


async def _main(args: argparse.Namespace) -> bool:
    if args.side == "relay":
        target = RelayTarget(args.url, args.token, args.http, args.timeout)
        outcomes = await RELAY_SUITE.run(target, timeout=args.timeout * 3, only=args.only)
    else:
        command = list(args.command)
        if command[:1] == ["--"]:
            command = command[1:]
        outcomes = await run_agent_suite(AgentTarget(command, args.token, args.timeout), only=args.only)
    return report(outcomes, verbose=not args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.side == "agent" and not [part for part in args.command if part != "--"]:
        print("python -m rtunnel.conformance agent: give the agent's command after --", file=sys.stderr)
        return 2
    if args.side == "relay":
        from rtunnel import transport

        try:
            transport.parse_relay_url(args.url)
        except ValueError as exc:
            print(f"python -m rtunnel.conformance relay: {exc}", file=sys.stderr)
            return 2
    failure = ""
    passed = interrupted = False
    try:
        passed = trio.run(_main, args)
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
