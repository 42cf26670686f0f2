"""The `rtunnel` argument parser: every subcommand's options, their help and defaults, and usage errors.

Usage errors are one line and exit 2 (`rtunnel dial: error: unrecognized option --upstrem (did you mean
--upstream?) (see rtunnel dial --help)`). The global options (--log-level, --log-format, --config) work before
or after the subcommand; every option's help shows its default.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .. import __version__
from ..ops.admin import DEFAULT_ADMIN
from ..ops.logs import LOG_FORMATS

__all__ = ["COMMANDS", "EXIT_CONFIG", "build_parser", "subparsers", "upstream_url"]

EXIT_CONFIG = 2
COMMANDS = ("serve", "dial", "status", "demo", "cert", "token", "completion")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def upstream_url(text: str) -> str:
    """`--upstream`: a URL, or as ngrok and cloudflared take it, `PORT` (http://127.0.0.1:PORT) or
    `HOST:PORT` (http://HOST:PORT). Anything else is left for the agent's own URL check."""
    text = text.strip()
    if text.isdigit():
        return f"http://127.0.0.1:{text}"
    host, sep, port = text.rpartition(":")
    if "://" not in text and sep and host and port.isdigit():
        return f"http://{text}"
    return text


def _shown(default: Any) -> str:
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


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
        return f"{text} (default {_shown(default).replace('%', '%%')})"


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


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


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


def _global_options(parser: argparse.ArgumentParser, *, config: bool, mirror: bool) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rtunnel", description="Reverse HTTP tunnel over one outbound WebSocket.")
    parser.add_argument("--version", action="version", version=f"rtunnel {__version__}")
    _global_options(parser, config=True, mirror=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    _serve_parser(commands.add_parser("serve", help="run the relay (where HTTP clients connect)"))
    _dial_parser(commands.add_parser("dial", help="run the agent (beside the service)"))

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
    _global_options(status, config=False, mirror=True)
    demo = commands.add_parser("demo", help="start a relay, an agent and a sample service on localhost")
    _global_options(demo, config=False, mirror=True)
    _cert_parser(commands.add_parser("cert", help="make a private CA and a TLS certificate for the relay"))
    commands.add_parser("token", help="print a new random token (for --token, --token-file, $RTUNNEL_TOKEN)")
    completion = commands.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=("bash", "zsh", "tcsh"), help="the shell to complete for")
    return parser


def _serve_parser(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--http",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="where HTTP clients connect (port 0: any)",
    )
    serve.add_argument(
        "--agents", default="127.0.0.1:8443", metavar="HOST:PORT", help="where agents connect (port 0: any)"
    )
    _token_options(serve)
    serve.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="certificate chain (PEM) for wss:// on --agents (default none: ws://)",
    )
    serve.add_argument("--tls-key", metavar="FILE", help="private key (PEM) for --tls-cert (default none)")
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
        help="a named tunnel (repeatable; default none); RULE: host:HOSTNAME, prefix:/PATH, keep-prefix "
        "(its own token: $RTUNNEL_TUNNEL_<NAME>_TOKEN)",
    )
    _liveness_options(serve)
    _balancer_options(serve)
    _limit_options(serve)
    _config_and_admin_options(serve)


def _dial_parser(dial: argparse.ArgumentParser) -> None:
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
    _token_options(dial)
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
    dial.add_argument(
        "--connect-timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="time to connect to the relay, and to the upstream",
    )
    dial.add_argument(
        "--response-timeout",
        type=_positive,
        default=60.0,
        metavar="SECONDS",
        help="time the upstream has to start answering before 504 (default 60)",
    )
    dial.add_argument(
        "--backoff-initial",
        type=_positive,
        default=0.5,
        metavar="SECONDS",
        help="first reconnect delay (doubling, with full jitter, up to --backoff-cap)",
    )
    dial.add_argument(
        "--backoff-cap", type=_positive, default=30.0, metavar="SECONDS", help="longest reconnect delay"
    )
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
    dial.add_argument(
        "--tunnel", metavar="NAME", help="the named tunnel of the relay this agent serves (default none)"
    )
    _liveness_options(dial)
    _config_and_admin_options(dial)


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
    cert.add_argument(
        "--days", type=_count, default=825, metavar="N", help="the relay certificate's validity"
    )


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
    from ..relay.exchange import HttpLimits
    from ..relay.server import RelayConfig

    limits, relay = HttpLimits(), RelayConfig()
    group = parser.add_argument_group("limits (0 disables a limit)")

    def add(option: str, kind: Callable[[str], Any], default: Any, unit: str, what: str) -> None:
        shown = "none" if default is None else _shown(default)
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
        type=_count_positive,
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


def _count_positive(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _balancer_options(parser: argparse.ArgumentParser) -> None:
    """Behind a load balancer or proxy (README, "Several agents, several relays"): who the client is."""
    group = parser.add_argument_group("behind a load balancer")
    group.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="HTTP connections start with a PROXY protocol v1/v2 header (HAProxy send-proxy, nginx "
        "proxy_protocol); connections without one are closed (default off)",
    )
    group.add_argument(
        "--agents-proxy-protocol",
        action="store_true",
        help="the same for the agents' listener, the header before TLS (default off)",
    )
    group.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="believe X-Forwarded-For from these proxies (repeatable; default none): the client is its "
        "rightmost address outside them",
    )


def _token_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("authentication")
    group.add_argument("--token", help="shared secret (default: $RTUNNEL_TOKEN, else none)")
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the token from FILE (serve: several, one per line, '#' comments; re-read on SIGHUP; "
        "default none)",
    )


def _config_and_admin_options(parser: argparse.ArgumentParser) -> None:
    from ..ops.inspector import DEFAULT_MAX_BODY
    from ..ops.redact import DEFAULT_WORDS

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
    _global_options(parser, config=True, mirror=True)


def _liveness_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ping-interval",
        type=_positive,
        default=5.0,
        metavar="SECONDS",
        help="ping the peer this often when the link is idle",
    )
    parser.add_argument(
        "--dead-timeout",
        type=_positive,
        default=20.0,
        metavar="SECONDS",
        help="declare the link dead after this long without any byte from the peer (default 20)",
    )
