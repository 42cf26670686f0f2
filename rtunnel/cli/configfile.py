"""`--config FILE`: a TOML file that sets any command-line option of `rtunnel serve` or `rtunnel dial`.

The keys are derived from the argparse parser itself, so an option added to the CLI is configurable at once:
an option's key is its long name without the leading dashes, with '-' written as '_' (`--agent-wait` ->
`agent_wait`, `--log-level` -> `log_level`); a positional takes its dest (`relay_urls`). Values have the
option's type: strings, numbers (seconds), booleans for switches, arrays for repeatable options.

Precedence: an option given on the command line > the file > $RTUNNEL_TOKEN > the built-in default. A secret
set both in the file and in the environment is a contradiction (rather than a silent winner), as are two
keys that exclude each other. Every problem is a `ConfigFileError` naming the file, the key and the reason.

The relay's file may also hold `[[tunnel]]` tables (name, token, hosts, path_prefix, strip_prefix), validated
here and handed on as `args.tunnels` (the named tunnels, registry.Tunnel); `tunnel = ["NAME=RULE", ...]` in
the `--tunnel` syntax works too. A tunnel's token may come from $RTUNNEL_TUNNEL_<NAME>_TOKEN instead (NAME
upper-cased, other characters as '_').
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
import re
import sys
import tomllib
from collections.abc import Iterator, Sequence
from typing import Any, Final, NoReturn

from ..config import ConfigError

__all__ = [
    "TUNNEL_NAME",
    "ConfigFileError",
    "TunnelSpec",
    "describe_error",
    "option_keys",
    "parse_args",
    "subparsers",
    "tunnel_token_env",
]

# Options that make no sense inside a file.
_NOT_KEYS: Final = frozenset({"help", "version", "config", "command"})
# Keys whose value is secret: never echoed in an error message.
SECRET_KEYS: Final = frozenset({"token", "admin_token"})
# Alternatives: one of them on the command line replaces every one of them from the file.
ALTERNATIVES: Final = (("token", "token_file"),)
# Pairs that cannot both be set.
EXCLUSIVE: Final = (("token", "token_file"),)
# Keys that need each other.
TOGETHER: Final = (("tls_cert", "tls_key"),)
TUNNEL_KEY: Final = "tunnel"
_TUNNEL_KEYS: Final = ("name", "token", "hosts", "path_prefix", "strip_prefix")
TUNNEL_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_OPTION_IN_TEXT: Final = re.compile(r"--[a-z][a-z0-9-]*")


class ConfigFileError(ConfigError):
    """A problem in a configuration file: the message names the file and the key."""

    command: str | None = None  # the subcommand whose file it is (for the error line's prefix)


@dataclasses.dataclass(frozen=True)
class TunnelSpec:
    """One `[[tunnel]]` table of the relay's configuration file."""

    name: str
    token: str | None = None
    hosts: tuple[str, ...] = ()
    path_prefix: str | None = None
    strip_prefix: bool = True


def tunnel_token_env(name: str) -> str:
    """The environment variable that may hold tunnel `name`'s token."""
    return "RTUNNEL_TUNNEL_" + re.sub(r"[^A-Z0-9]", "_", name.upper()) + "_TOKEN"


@dataclasses.dataclass(frozen=True)
class _Option:
    key: str
    action: argparse.Action
    owner: argparse.ArgumentParser
    default: Any


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands' parsers, by name ({} for a parser without subcommands)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _key_of(action: argparse.Action) -> str:
    long_names = [name for name in action.option_strings if name.startswith("--")]
    name = long_names[0][2:] if long_names else action.dest
    return name.replace("-", "_")


def option_keys(parser: argparse.ArgumentParser, command: str) -> dict[str, _Option]:
    """Every key a file for `command` may hold (top-level options and the command's own), by key."""
    options: dict[str, _Option] = {}
    for owner in (parser, subparsers(parser)[command]):
        for action in owner._actions:
            if isinstance(action, argparse._SubParsersAction) or action.dest in _NOT_KEYS:
                continue
            if action.dest == argparse.SUPPRESS:
                continue
            # A global option repeated on the subcommand (cli/parse.py) belongs to the top-level parser.
            options.setdefault(_key_of(action), _Option(_key_of(action), action, owner, action.default))
    return options


# -- reading and checking the file ---------------------------------------------------------------------


class _File:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, reason: str, key: str | None = None) -> NoReturn:
        where = f"config file {self.path}"
        if key is not None:
            where += f", key {key!r}"
        raise ConfigFileError(f"{where}: {reason}")

    def load(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as file:
                return tomllib.load(file)
        except OSError as exc:
            self.fail(f"cannot read it: {exc.strerror or exc}")
        except tomllib.TOMLDecodeError as exc:
            self.fail(f"invalid TOML: {exc}")
        except UnicodeDecodeError:
            self.fail("invalid TOML: not UTF-8 text")


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _show(key: str, value: object) -> str:
    return "" if key in SECRET_KEYS else f" {value!r}"


def _scalar(file: _File, option: _Option, value: object) -> object:
    action, key = option.action, option.key
    kind = action.type
    if kind is None or kind is str:
        if not isinstance(value, str):
            file.fail(f"expected a string, got {_type_name(value)}", key)
        result: object = value
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            file.fail(f"expected an integer, got {_type_name(value)}", key)
        result = value
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            file.fail(f"expected a number, got {_type_name(value)}", key)
        result = float(value)
    elif callable(kind):
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            file.fail(f"expected a string or a number, got {_type_name(value)}", key)
        try:
            result = kind(str(value))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            file.fail(f"invalid value{_show(key, value)}: {exc or 'wrong format'}", key)
    else:  # pragma: no cover - an argparse.FileType: rtunnel does not use one
        file.fail("this option cannot be set from a file", key)
    if action.choices is not None and result not in action.choices:
        choices = ", ".join(repr(choice) for choice in action.choices)
        file.fail(f"invalid value{_show(key, value)}: choose from {choices}", key)
    return result


def _convert(file: _File, option: _Option, value: object) -> object:
    """The file's value as argparse would have stored it had it come from the command line."""
    action, key = option.action, option.key
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            file.fail(f"expected true or false, got {_type_name(value)}", key)
        return value
    if isinstance(action, argparse._StoreConstAction | argparse._AppendConstAction):
        if not isinstance(value, bool):
            file.fail(f"expected true or false, got {_type_name(value)}", key)
        if not value:
            return option.default
        return [action.const] if isinstance(action, argparse._AppendConstAction) else action.const
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            file.fail(f"expected a count (an integer >= 0), got {_type_name(value)}", key)
        return value
    repeated = isinstance(action, argparse._AppendAction | argparse._ExtendAction)
    if repeated or action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            file.fail(f"expected an array, got {_type_name(value)}", key)
        if action.nargs == "+" and not value:
            file.fail("expected at least one value, got an empty array", key)
        if isinstance(action.nargs, int) and not repeated and len(value) != action.nargs:
            file.fail(f"expected {action.nargs} values, got {len(value)}", key)
        return [_scalar(file, option, item) for item in value]
    return _scalar(file, option, value)


def _unknown(file: _File, key: str, known: Sequence[str], command: str, other: dict[str, str]) -> NoReturn:
    guess = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
    if guess:
        file.fail(f"unknown key (did you mean {guess[0]!r}?)", key)
    if key in other:
        file.fail(f"unknown key: an option of `rtunnel {other[key]}`, not of `rtunnel {command}`", key)
    if key == TUNNEL_KEY:
        file.fail("unknown key: [[tunnel]] tables are an option of `rtunnel serve` (the relay)", key)
    file.fail(f"unknown key; valid keys: {', '.join(sorted(known))}", key)


def _tunnels(file: _File, value: object) -> tuple[TunnelSpec, ...]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        file.fail("expected [[tunnel]] tables (an array of tables)", TUNNEL_KEY)
    specs: list[TunnelSpec] = []
    names: set[str] = set()
    hosts_seen: dict[str, str] = {}
    prefixes_seen: dict[str, str] = {}
    for index, table in enumerate(value):
        where = f"{TUNNEL_KEY}[{index}]"
        for key in table:
            if key not in _TUNNEL_KEYS:
                file.fail(f"unknown key (a tunnel has {', '.join(_TUNNEL_KEYS)})", f"{where}.{key}")
        name = table.get("name")
        if not isinstance(name, str) or not TUNNEL_NAME.fullmatch(name):
            file.fail("a tunnel needs a name: letters, digits, '.', '_', '-' (at most 63)", f"{where}.name")
        if name in names:
            file.fail(f"tunnel name {name!r} is used twice", f"{where}.name")
        names.add(name)
        token = table.get("token")
        if token is not None and (not isinstance(token, str) or not token or any(c.isspace() for c in token)):
            file.fail("expected a non-empty string without white space", f"{where}.token")
        env_name = tunnel_token_env(name)
        env_token = os.environ.get(env_name) or None
        if token is not None and env_token is not None and env_token != token:
            file.fail(
                f"set both in the file and in ${env_name}; keep the secret in one place", f"{where}.token"
            )
        hosts = table.get("hosts", [])
        if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
            file.fail("expected an array of host names", f"{where}.hosts")
        for host in hosts:
            folded = host.lower().rstrip(".")
            if folded in hosts_seen:
                file.fail(
                    f"host {host!r} is already routed to tunnel {hosts_seen[folded]!r}", f"{where}.hosts"
                )
            hosts_seen[folded] = name
        prefix = table.get("path_prefix")
        if prefix is not None:
            if not isinstance(prefix, str) or not prefix.startswith("/"):
                file.fail("expected a path starting with '/'", f"{where}.path_prefix")
            if prefix in prefixes_seen:
                file.fail(f"already routed to tunnel {prefixes_seen[prefix]!r}", f"{where}.path_prefix")
            prefixes_seen[prefix] = name
        strip = table.get("strip_prefix", True)
        if not isinstance(strip, bool):
            file.fail(f"expected true or false, got {_type_name(strip)}", f"{where}.strip_prefix")
        specs.append(TunnelSpec(name, token or env_token, tuple(hosts), prefix, strip))
    return tuple(specs)


# -- parsing the command line with a file ----------------------------------------------------------------


class _Bail(Exception):
    """The lenient first pass could not parse the command line: let the real parser report it."""


class _BailAction(argparse.Action):
    def __call__(self, *args: object, **kwargs: object) -> None:
        raise _Bail


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    yield from subparsers(parser).values()


def _explicit(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | None:
    """Only what the command line says (no defaults), parsed without the required-option checks, so that
    the command and its --config are known before the file supplies what is missing. None if unparsable."""
    lenient = copy.deepcopy(parser)
    for each in _all_parsers(lenient):

        def bail(message: str) -> NoReturn:
            raise _Bail(message)

        each.error = bail  # type: ignore[method-assign]
        for action in each._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                # Help and version belong to the real parser: this pass must not print or exit.
                action.__class__ = _BailAction  # type: ignore[assignment]
            elif not isinstance(action, argparse._SubParsersAction):
                action.default = argparse.SUPPRESS
                action.required = False
                if not action.option_strings and action.nargs == "+":
                    action.nargs = "*"
    try:
        return lenient.parse_args(argv)
    except _Bail:
        return None


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with the values of `--config FILE` as defaults that flags override.

    Sets `args.config_file` (None without one), `args.config_keys` ({dest: key} of the values the file
    supplied) and, for commands with a `[[tunnel]]` table, `args.tunnels`. Raises ConfigFileError.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    given = _explicit(parser, argv)
    path = getattr(given, "config", None) if given is not None else None
    config_keys: dict[str, str] = {}
    tunnels: tuple[TunnelSpec, ...] = ()
    try:
        if given is not None and path is not None:
            tunnels, config_keys = _apply_file(parser, given.command, path, set(vars(given)))
        args = parser.parse_args(argv)
        args.config_file = path
        args.config_keys = config_keys
        if args.command == "serve":
            args.tunnels = tunnels
        if path is not None:
            _check_contradictions(_File(path), args, config_keys)
    except ConfigFileError as exc:
        exc.command = given.command if given is not None else None
        raise
    return args


def _apply_file(
    parser: argparse.ArgumentParser, command: str, path: str, explicit: set[str]
) -> tuple[tuple[TunnelSpec, ...], dict[str, str]]:
    if "config" not in {action.dest for action in subparsers(parser)[command]._actions}:
        raise ConfigFileError(f"--config applies to `rtunnel serve` and `rtunnel dial`, not {command}")
    file = _File(path)
    options = option_keys(parser, command)
    data = file.load()
    other_keys = {
        key: name for name in subparsers(parser) if name != command for key in _subkeys(parser, name)
    }
    tunnels: tuple[TunnelSpec, ...] = ()
    values: dict[str, object] = {}
    for key, value in data.items():
        is_table_list = not (isinstance(value, list) and all(isinstance(item, str) for item in value))
        if key == TUNNEL_KEY and command == "serve" and (key not in options or is_table_list):
            # [[tunnel]] tables; an array of strings is the --tunnel option's own syntax.
            tunnels = _tunnels(file, value)
            continue
        if key == TUNNEL_KEY and command != "serve" and isinstance(value, list):
            file.fail(
                "[[tunnel]] tables are an option of `rtunnel serve` (the relay); an agent names the tunnel "
                'it serves with tunnel = "NAME"',
                key,
            )
        option = options.get(key)
        if option is None:
            _unknown(file, key, list(options), command, other_keys)
        values[key] = _convert(file, option, value)
    # A flag replaces the file's value (even for repeatable options: the file's list is not extended), and a
    # flag for one of a set of alternatives (--token-file) replaces the file's other ones (token) too.
    overridden = {option.key for option in options.values() if option.action.dest in explicit}
    for group in ALTERNATIVES:
        if overridden & set(group):
            overridden |= set(group)
    config_keys: dict[str, str] = {}
    for key, value in values.items():
        if key in overridden:
            continue
        option = options[key]
        action = option.action
        option.owner.set_defaults(**{action.dest: value})
        action.required = False
        if not action.option_strings and action.nargs == "+":
            action.nargs = "*"  # a positional the file supplies becomes optional on the command line
        config_keys[action.dest] = key
    return tunnels, config_keys


def _subkeys(parser: argparse.ArgumentParser, command: str) -> list[str]:
    sub = subparsers(parser)[command]
    return [_key_of(a) for a in sub._actions if a.dest not in _NOT_KEYS and a.dest != argparse.SUPPRESS]


def _check_contradictions(file: _File, args: argparse.Namespace, config_keys: dict[str, str]) -> None:
    """Rules spanning several keys, where at least one value came from the file (the CLI checks the rest)."""
    from_file = set(config_keys.values())
    value_of = {key: getattr(args, dest, None) for dest, key in config_keys.items()}

    def is_set(key: str) -> bool:
        return getattr(args, key, None) not in (None, False, [], ())

    for first, second in EXCLUSIVE:
        if (first in from_file or second in from_file) and is_set(first) and is_set(second):
            file.fail(
                f"contradicts {second!r}: set only one of them", first if first in from_file else second
            )
    for first, second in TOGETHER:
        for key, partner in ((first, second), (second, first)):
            if key in from_file and is_set(key) and hasattr(args, partner) and not is_set(partner):
                file.fail(f"needs {partner!r} as well (in the file or on the command line)", key)
    env_token = os.environ.get("RTUNNEL_TOKEN") or None
    if env_token is not None:
        if "token" in from_file and value_of.get("token") not in (None, env_token):
            file.fail("set both in the file and in $RTUNNEL_TOKEN; keep the secret in one place", "token")
        if "token_file" in from_file and value_of.get("token_file") is not None:
            file.fail("contradicts $RTUNNEL_TOKEN (both set); keep the secret in one place", "token_file")


def describe_error(message: str, args: argparse.Namespace) -> str:
    """Point an option's error at the file when that option's value came from it.

    Settings are validated after parsing (commands.py), in messages that name the option (`--http: expected
    HOST:PORT`); when the bad value was the file's, the user must be told to look there instead.
    """
    path: str | None = getattr(args, "config_file", None)
    config_keys: dict[str, str] = getattr(args, "config_keys", {})
    if path is None or not config_keys:
        return message
    dashed = {"--" + key.replace("_", "-"): key for key in config_keys.values()}
    for match in _OPTION_IN_TEXT.finditer(message):
        key = dashed.get(match.group(0))
        if key is None:
            continue
        rest = message
        if message.startswith(match.group(0) + ": "):
            rest = message[len(match.group(0)) + 2 :]
        return f"config file {path}, key {key!r}: {rest}"
    for dest, key in config_keys.items():
        value = getattr(args, dest, None)
        items = value if isinstance(value, list) else [value]
        if key not in SECRET_KEYS and any(isinstance(v, str) and repr(v) in message for v in items):
            return f"config file {path}, key {key!r}: {message}"
    return message
