"""The `rtunnel` argument parser: the commands, the small tools' options (serve.py and dial.py add their own),
help that shows every default, and usage errors.

Usage errors are one line and exit 2 (`rtunnel dial: error: unrecognized option --upstrem (did you mean
--upstream?) (see rtunnel dial --help)`). The global options (--log-level, --log-format, --config) work before
or after the subcommand; every option's help shows its default.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .. import __version__
from ..ops.admin import DEFAULT_ADMIN
from .common import global_options
from .configfile import subparsers
from .dial import add_dial_options
from .serve import add_serve_options
from .values import count, shown

__all__ = ["COMMANDS", "EXIT_CONFIG", "build_parser", "subparsers"]

EXIT_CONFIG = 2
COMMANDS = ("serve", "dial", "status", "demo", "cert", "token", "completion")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless its help already says it (or there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default in (None, False, [], argparse.SUPPRESS)
            or isinstance(action, argparse._VersionAction)
        ):
            return text
        return f"{text} (default {shown(default).replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the contract for bad configuration), not argparse's usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        commands = subparsers(self)
        if commands:  # the top-level parser: check option names before argparse's other complaints
            _check_option_names(self, commands, list(sys.argv[1:] if args is None else args))
        return super().parse_known_args(args, namespace)


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions for name in action.option_strings}


def _check_option_names(
    top: argparse.ArgumentParser, commands: dict[str, argparse.ArgumentParser], argv: list[str]
) -> None:
    """An unknown `--option` is named with the closest option of its subcommand. Checked before parsing,
    since argparse would first complain about a required option the typo was meant to be."""
    owner, known = top, _option_strings(top)
    for token in argv:
        if token == "--":
            return
        if owner is top and token in commands:
            owner = commands[token]
            known = known | _option_strings(owner)
            continue
        if not token.startswith("--"):
            continue
        name = token.partition("=")[0]
        if name in known or any(option.startswith(name) for option in known):
            continue  # known, or an abbreviation argparse resolves (or calls ambiguous itself)
        close = difflib.get_close_matches(name, sorted(o for o in known if o.startswith("--")), n=1)
        elsewhere = sorted(
            c for c, sub in commands.items() if sub is not owner and name in _option_strings(sub)
        )
        if elsewhere:
            hint = f" (an option of `rtunnel {elsewhere[0]}`)"
        elif close:
            hint = f" (did you mean {close[0]}?)"
        else:
            hint = ""
        owner.error(f"unrecognized option {name}{hint}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rtunnel", description="Reverse HTTP tunnel over one outbound WebSocket.")
    parser.add_argument("--version", action="version", version=f"rtunnel {__version__}")
    global_options(parser, config=True, mirror=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    add_serve_options(commands.add_parser("serve", help="run the relay (where HTTP clients connect)"))
    add_dial_options(commands.add_parser("dial", help="run the agent (beside the service)"))

    status = commands.add_parser("status", help="show the agents (or relays) of a running relay (or agent)")
    status.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="URL",
        help=f"the admin endpoint of `serve --admin` or `dial --admin` (default {DEFAULT_ADMIN})",
    )
    status.add_argument(
        "--admin-token", metavar="TOKEN", help="its --admin-token (default: $RTUNNEL_ADMIN_TOKEN, else none)"
    )
    global_options(status, config=False, mirror=True)
    demo = commands.add_parser("demo", help="start a relay, an agent and a sample service on localhost")
    global_options(demo, config=False, mirror=True)
    _cert_parser(commands.add_parser("cert", help="make a private CA and a TLS certificate for the relay"))
    commands.add_parser("token", help="print a new random token (for --token, --token-file, $RTUNNEL_TOKEN)")
    completion = commands.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=("bash", "zsh", "tcsh"), help="the shell to complete for")
    return parser


def _cert_parser(cert: argparse.ArgumentParser) -> None:
    cert.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME",
        help="a DNS name or IP address agents use to reach the relay (repeatable; required)",
    )
    cert.add_argument(
        "--out",
        default=".",
        metavar="DIR",
        help="where to write ca.pem, ca-key.pem, relay.pem, relay-key.pem (an existing CA there is reused)",
    )
    cert.add_argument("--days", type=count, default=825, metavar="N", help="the relay certificate's validity")
