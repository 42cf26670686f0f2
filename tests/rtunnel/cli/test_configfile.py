"""`--config FILE`: every error names the file and the key; flags override the file; every option of `serve`
and `dial` can be set from a file (the key set is derived from the real parser, so new options are covered)."""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from rtunnel.cli import commands as cli
from rtunnel.cli.configfile import EXCLUSIVE, ConfigFileError, TunnelSpec, option_keys, parse_args

from ...e2e.procs import REPO_ROOT, RTUNNEL_CMD, Agent, http_client, run_process, run_relay
from ...e2e.upstream import open_upstream

DIAL_BASE = 'relay_urls = ["ws://127.0.0.1:9"]\nupstream = "http://127.0.0.1:5000"\n'


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RTUNNEL_TOKEN", raising=False)


def write(tmp_path: Path, text: str, name: str = "rtunnel.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    return parse_args(cli.build_parser(), list(argv))


def error_of(argv: Sequence[str]) -> str:
    with pytest.raises(ConfigFileError) as info:
        parse(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "text", "key", "reason"),
    [
        ("serve", "agent-wait = 3\n", "agent-wait", "did you mean 'agent_wait'?"),
        ("serve", "colour = 'blue'\n", "colour", "unknown key; valid keys:"),
        (
            "serve",
            "upstream = 'http://x:1'\n",
            "upstream",
            "an option of `rtunnel dial`, not of `rtunnel serve`",
        ),
        ("serve", "[serve]\nhttp = '127.0.0.1:1'\n", "serve", "unknown key"),
        ("serve", "agent_wait = 'ten'\n", "agent_wait", "expected a number, got a string"),
        ("serve", "agent_wait = true\n", "agent_wait", "expected a number, got a boolean"),
        ("serve", "http = 8080\n", "http", "expected a string, got an integer"),
        ("serve", "ping_interval = -1\n", "ping_interval", "must be greater than 0"),
        ("serve", "log_level = 'loud'\n", "log_level", "choose from 'debug', 'info'"),
        ("serve", "token = 42\n", "token", "expected a string"),
        ("dial", DIAL_BASE + "allow = 'GET /'\n", "allow", "expected an array, got a string"),
        ("dial", DIAL_BASE + "allow = [1]\n", "allow", "expected a string, got an integer"),
        ("dial", DIAL_BASE + "insecure = 'yes'\n", "insecure", "expected true or false"),
        ("dial", 'relay_urls = []\nupstream = "http://h:1"\n', "relay_urls", "at least one value"),
        ("dial", DIAL_BASE + "[[tunnel]]\nname = 'a'\n", "tunnel", "an option of `rtunnel serve`"),
        # contradictions
        ("serve", "token = 'a'\ntoken_file = 'b'\n", "token", "contradicts 'token_file'"),
        ("serve", "tls_cert = 'c.pem'\n", "tls_cert", "needs 'tls_key' as well"),
        ("serve", "tls_key = 'k.pem'\n", "tls_key", "needs 'tls_cert' as well"),
    ],
)
def test_errors_name_the_file_the_key_and_the_reason(
    tmp_path: Path, command: str, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    message = error_of([command, "--config", path])
    assert message.startswith(f"config file {path}, key {key!r}: "), message
    assert reason in message


def test_secret_values_are_not_echoed(tmp_path: Path) -> None:
    message = error_of(["serve", "--config", write(tmp_path, "token = ['hunter2']\n")])
    assert "hunter2" not in message


def test_secret_in_file_and_environment_is_a_contradiction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RTUNNEL_TOKEN", "from-env")
    path = write(tmp_path, "token = 'from-file'\n")
    message = error_of(["serve", "--config", path])
    assert message.startswith(f"config file {path}, key 'token': ")
    assert "$RTUNNEL_TOKEN" in message and "from-env" not in message and "from-file" not in message
    # The same secret in both places is no contradiction; a flag decides on its own.
    assert parse(["serve", "--config", write(tmp_path, "token = 'from-env'\n")]).token == "from-env"
    assert parse(["serve", "--config", path, "--token", "flag"]).token == "flag"
    # A token file in the config beside $RTUNNEL_TOKEN: two sources for one secret.
    message = error_of(["serve", "--config", write(tmp_path, "token_file = 't.txt'\n")])
    assert "key 'token_file'" in message and "$RTUNNEL_TOKEN" in message


def test_unreadable_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    assert error_of(["serve", "--config", missing]) == (
        f"config file {missing}: cannot read it: No such file or directory"
    )
    message = error_of(["serve", "--config", str(tmp_path)])
    assert message.startswith(f"config file {tmp_path}: cannot read it: ")


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "http = '127.0.0.1:1'\nagent_wait = \n")
    message = error_of(["serve", "--config", path])
    assert message.startswith(f"config file {path}: invalid TOML: ")
    assert "line 2" in message
    binary = write(tmp_path, "", "binary.toml")
    Path(binary).write_bytes(b"http = '\xff'\n")
    assert "invalid TOML" in error_of(["serve", "--config", binary])


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[[tunnel]]\nhosts = ['a.example']\n", "tunnel[0].name", "needs a name"),
        ("[[tunnel]]\nname = 'a'\n[[tunnel]]\nname = 'a'\n", "tunnel[1].name", "used twice"),
        ("[[tunnel]]\nname = 'a'\nport = 1\n", "tunnel[0].port", "unknown key"),
        ("[[tunnel]]\nname = 'a'\nhosts = 'a.example'\n", "tunnel[0].hosts", "array of host names"),
        (
            "[[tunnel]]\nname = 'a'\nhosts = ['x.example']\n[[tunnel]]\nname = 'b'\nhosts = ['X.example']\n",
            "tunnel[1].hosts",
            "already routed to tunnel 'a'",
        ),
        ("[[tunnel]]\nname = 'a'\npath_prefix = 'api'\n", "tunnel[0].path_prefix", "starting with '/'"),
        ("tunnel = 'a'\n", "tunnel", "array of tables"),
    ],
)
def test_tunnel_table_errors(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    message = error_of(["serve", "--config", path])
    assert message.startswith(f"config file {path}, key {key!r}: "), message
    assert reason in message


def test_tunnel_table_is_passed_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTUNNEL_TUNNEL_API_V2_TOKEN", "env-secret")
    path = write(
        tmp_path,
        "[[tunnel]]\nname = 'shop'\ntoken = 'shop-secret'\nhosts = ['shop.example.com']\n"
        "[[tunnel]]\nname = 'api-v2'\npath_prefix = '/api/'\n",
    )
    args = parse(["serve", "--config", path])
    assert args.tunnels == (
        TunnelSpec("shop", "shop-secret", ("shop.example.com",), None),
        TunnelSpec("api-v2", "env-secret", (), "/api/"),
    )
    assert parse(["serve"]).tunnels == ()


# -- precedence ----------------------------------------------------------------------------------------------


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        DIAL_BASE + "allow = ['GET /a', 'GET /b']\ninsecure = true\nping_interval = 2\nlog_level = 'debug'\n",
    )
    args = parse(["dial", "--config", path])
    assert args.relay_urls == ["ws://127.0.0.1:9"]
    assert args.upstream == "http://127.0.0.1:5000"
    assert args.allow == ["GET /a", "GET /b"]
    assert args.insecure is True
    assert args.ping_interval == 2.0
    assert args.log_level == "debug"
    assert args.config_keys["allow"] == "allow"

    args = parse(
        [
            "--log-level",
            "error",
            "dial",
            "ws://other:1",
            "--config",
            path,
            "--allow",
            "POST /c",
            "--ping-interval",
            "3",
        ]
    )
    assert args.relay_urls == ["ws://other:1"]  # replaced, not extended
    assert args.allow == ["POST /c"]  # replaced, not appended to
    assert args.ping_interval == 3.0
    assert args.log_level == "error"
    assert args.upstream == "http://127.0.0.1:5000"  # still from the file
    assert "allow" not in args.config_keys


def test_a_flag_replaces_the_files_alternatives(tmp_path: Path) -> None:
    path = write(tmp_path, "token = 'from-file'\n")
    args = parse(["serve", "--config", path, "--token-file", "t.txt"])
    assert args.token is None and args.token_file == "t.txt"


def test_without_a_file_required_options_stay_required(capsys: pytest.CaptureFixture[str]) -> None:
    # (--upstream is no longer one: exactly one of it and --app is, checked once the file is applied.)
    with pytest.raises(SystemExit) as info:
        parse(["dial"])
    assert info.value.code == cli.EXIT_CONFIG
    assert "RELAY_URL" in capsys.readouterr().err


def test_help_is_unaffected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(["dial", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "RELAY_URL [RELAY_URL ...]" in out and "==SUPPRESS==" not in out


# -- every option round-trips --------------------------------------------------------------------------------

# Values that a custom option type may accept, tried in order (an option added with a new kind of value
# that none of these fits makes test_every_option_round_trips fail: add a sample here).
_CANDIDATES = ("2.5", "7", "64KiB", "1MB", "10s", "sample")


def _sample(action: argparse.Action, key: str, index: int) -> tuple[Any, str]:
    """A non-default value for one option: (TOML value, command-line text)."""
    if action.choices is not None:
        choices = [c for c in action.choices if c != action.default]
        return choices[index % len(choices)], str(choices[index % len(choices)])
    kind = action.type
    if kind is None or kind is str:
        return f"{key}-sample-{index}", f"{key}-sample-{index}"
    if kind is int:
        return 7 + index, str(7 + index)
    if kind is float:
        return 2.5 + index, str(2.5 + index)
    assert callable(kind)
    for text in _CANDIDATES:
        try:
            kind(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            continue
        try:
            return json.loads(text), text
        except ValueError:
            return text, text
    raise AssertionError(f"no sample value for --{key}: extend _CANDIDATES")


def _generate(
    parser: argparse.ArgumentParser, command: str, skip: frozenset[str]
) -> tuple[str, list[str], list[str]]:
    """A TOML file setting every option of `command` but `skip`, and the same settings as command-line
    arguments (those before the command name, and those after it)."""
    toml: list[str] = []
    top: list[str] = []
    sub: list[str] = []
    positionals: list[str] = []
    for key, option in option_keys(parser, command).items():
        if key in skip:
            continue
        action = option.action
        flags = top if option.owner is parser else sub
        name = action.option_strings[0] if action.option_strings else None
        if isinstance(action, argparse._StoreConstAction | argparse.BooleanOptionalAction):
            assert name is not None
            toml.append(f"{key} = true")
            flags.append(name)
        elif isinstance(action, argparse._AppendAction | argparse._ExtendAction):
            assert name is not None
            values = [_sample(action, key, i) for i in range(2)]
            toml.append(f"{key} = {json.dumps([value for value, _ in values])}")
            for _, text in values:
                flags.extend([name, text])
        elif action.nargs in ("+", "*"):
            values = [_sample(action, key, i) for i in range(2)]
            toml.append(f"{key} = {json.dumps([value for value, _ in values])}")
            texts = [text for _, text in values]
            if name is None:
                positionals.extend(texts)
            else:
                flags.extend([name, *texts])
        else:
            value, text = _sample(action, key, 0)
            toml.append(f"{key} = {json.dumps(value)}")
            if name is None:
                positionals.append(text)
            else:
                flags.extend([name, text])
    return "\n".join(toml) + "\n", top, [*positionals, *sub]


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]  # type: ignore[no-any-return]
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("command", ["serve", "dial"])
def test_every_option_round_trips(tmp_path: Path, command: str) -> None:
    parser = cli.build_parser()
    keys = option_keys(parser, command)
    # Every option of the command (and every top-level one) has a key.
    dests = {a.dest for p in (parser, _command_parser(parser, command)) for a in p._actions}
    assert dests - {"help", "version", "command", "config"} == {o.action.dest for o in keys.values()}
    required = ["ws://x:1", "--upstream", "u"] if command == "dial" else []
    defaults = parse_args(cli.build_parser(), [command, *required])

    def options(args: argparse.Namespace) -> dict[str, Any]:
        return {
            k: v
            for k, v in vars(args).items()
            if k not in ("config", "config_file", "config_keys", "tunnels")
        }

    # Two files, since options that exclude each other (token, token_file) cannot be set in one.
    applied: set[str] = set()
    for side in (0, 1):
        skip = frozenset(pair[1 - side] for pair in EXCLUSIVE)
        text, top, sub = _generate(cli.build_parser(), command, skip)
        path = write(tmp_path, text, f"every-{side}.toml")
        from_file = parse_args(cli.build_parser(), [command, "--config", path])
        from_flags = parse_args(cli.build_parser(), [*top, command, *sub])
        assert set(from_file.config_keys.values()) == set(keys) - skip, "a key of the file was not applied"
        applied |= set(from_file.config_keys.values())
        assert options(from_file) == options(from_flags)
        for key, option in keys.items():  # every value differs from its default: the file really set it
            if key not in skip:
                dest = option.action.dest
                assert getattr(from_file, dest) != getattr(defaults, dest), key
    assert applied == set(keys)


# -- through the real command --------------------------------------------------------------------------------


def run_rtunnel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rtunnel", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("agents = 1\n", "key 'agents': expected a string, got an integer"),
        ("http = 'no-port'\n", "key 'http': expected HOST:PORT, got 'no-port'"),
        ("admin = 'x:y'\n", "key 'admin': expected [HOST:]PORT, got 'x:y'"),
    ],
)
def test_the_command_exits_2_with_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    result = run_rtunnel("serve", "--config", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"rtunnel serve: error: config file {path}, {expected}\n"


async def test_relay_and_agent_run_from_config_files(tmp_path: Path) -> None:
    """docs/configuration.md's example, for real: both sides configured by files, the secret from the
    environment."""
    token = secrets.token_urlsafe(16)
    relay_toml = write(
        tmp_path,
        'http = "127.0.0.1:0"\nagents = "127.0.0.1:0"\nagent_wait = 5\nadmin = "127.0.0.1:0"\n',
        "relay.toml",
    )
    async with (
        open_upstream() as upstream,
        run_relay(None, extra_args=["--config", relay_toml], env={"RTUNNEL_TOKEN": token}) as relay,
    ):
        agent_toml = write(
            tmp_path,
            f'relay_urls = ["{relay.agents_url}"]\nupstream = "{upstream.url}"\nallow = ["GET /ok/**"]\n'
            'log_format = "json"\n',
            "agent.toml",
        )
        args = [*RTUNNEL_CMD, "dial", "--config", agent_toml]
        async with (
            run_process(Agent, "agent", args, env={"RTUNNEL_TOKEN": token}) as agent,
            http_client(relay.http_url) as client,
        ):
            await agent.wait_connected()
            assert (await client.get("/ok/1")).status_code == 200
            assert (await client.get("/other")).status_code == 403  # the file's allow rule applies
        assert all(line.startswith("{") for line in agent.stderr_lines if line)
    assert upstream.paths == ["/ok/1"]
