"""What more than one command takes: the option groups `serve` and `dial` share (authentication, liveness,
grace, admin and inspector, the global options), and the admin endpoint both build from theirs."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from ..ops.admin import AdminServer, parse_admin_address
from ..ops.adminauth import is_loopback
from ..ops.dashboard import Dashboard, Replayer
from ..ops.inspector import DEFAULT_MAX_BODY, Inspector
from ..ops.logs import LOG_FORMATS
from ..ops.redact import DEFAULT_WORDS, Redactor
from .values import count, is_token_text, positive, size

if TYPE_CHECKING:
    from ..ops.metrics import Metrics

__all__ = [
    "admin_options",
    "admin_server",
    "global_options",
    "grace_option",
    "liveness_options",
    "token_options",
]

LOG_LEVELS = ("debug", "info", "warning", "error")


def global_options(parser: argparse.ArgumentParser, *, config: bool, mirror: bool) -> None:
    """--log-level, --log-format (and --config): on the top-level parser with their defaults, and again on
    a subcommand (`mirror`) without defaults, so that given after the subcommand they win and, not given
    there, they leave the top-level value alone."""
    owner: Any = (
        parser.add_argument_group("global options (before or after the subcommand)") if mirror else parser
    )
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if mirror else {}
    owner.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="debug, info, warning or error (default info)",
        **({"default": "info"} | unset),
    )
    owner.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text, or json: one object a line (default text)",
        **({"default": "text"} | unset),
    )
    if config:
        owner.add_argument(
            "--config",
            metavar="FILE",
            help="TOML file setting any option of serve or dial (flags given here win; default none)",
            **({"default": None} | unset),
        )


def token_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("authentication")
    group.add_argument("--token", help="shared secret (default: $RTUNNEL_TOKEN, else none)")
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the token from FILE (serve: several, one per line, '#' comments; re-read on SIGHUP; "
        "default none)",
    )


def grace_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight exchanges may finish (default 30)",
    )


def liveness_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ping-interval",
        type=positive,
        default=5.0,
        metavar="SECONDS",
        help="ping the peer this often when the link is idle",
    )
    parser.add_argument(
        "--dead-timeout",
        type=positive,
        default=20.0,
        metavar="SECONDS",
        help="declare the link dead after this long without any byte from the peer (default 20)",
    )


def admin_options(parser: argparse.ArgumentParser) -> None:
    """The access log, the admin endpoint and its inspector, then the global options (the help's last)."""
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
        "default off)",
    )
    parser.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help="require this token (Bearer, or the login form) on every admin path but /healthz and /readyz "
        "(default: $RTUNNEL_ADMIN_TOKEN, else none)",
    )
    parser.add_argument(
        "--inspect",
        type=count,
        default=0,
        metavar="N",
        help="keep the last N exchanges for the inspector page (default 0: off; needs --admin)",
    )
    parser.add_argument(
        "--inspect-max-body",
        type=size,
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
    global_options(parser, config=True, mirror=True)


def admin_server(
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
    if not is_token_text(token):
        raise ConfigError("admin token: printable ASCII without spaces")
    if len(token) < 16:
        raise ConfigError("admin token: at least 16 characters (e.g. `openssl rand -hex 16`)")
