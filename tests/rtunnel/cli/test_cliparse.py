"""The parser as a user meets it: global options anywhere, "did you mean", help with defaults, --upstream forms."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from rtunnel.cli import commands as cli
from rtunnel.cli.configfile import parse_args
from rtunnel.cli.parse import subparsers
from rtunnel.cli.values import upstream_url

DIAL = ["dial", "ws://relay:8443", "--upstream", "5000"]


def parse(*argv: str) -> argparse.Namespace:
    return parse_args(cli.build_parser(), list(argv))


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == cli.EXIT_CONFIG
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("command", [["serve"], DIAL, ["status"], ["demo"]])
def test_global_options_before_or_after_the_subcommand(command: list[str]) -> None:
    name, rest = command[0], command[1:]
    defaults = parse(*command)
    assert (defaults.log_level, defaults.log_format) == ("info", "text")
    before = parse("--log-level", "debug", "--log-format", "json", name, *rest)
    after = parse(name, *rest, "--log-level", "debug", "--log-format", "json")
    assert (before.log_level, before.log_format) == (after.log_level, after.log_format) == ("debug", "json")
    # Given twice, the later one wins, as for any option.
    assert parse("--log-level", "error", name, *rest, "--log-level", "warning").log_level == "warning"


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_before_or_after_the_subcommand(tmp_path: Path, where: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('agent_wait = 3\nlog_level = "debug"\n')
    argv = ["--config", str(path), "serve"] if where == "before" else ["serve", "--config", str(path)]
    args = parse(*argv)
    assert (args.agent_wait, args.log_level, args.config_file) == (3.0, "debug", str(path))
    # A flag after the subcommand still beats the file.
    assert parse(*argv, "--log-level", "error").log_level == "error"


def test_config_for_a_command_without_options_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("")
    with pytest.raises(cli.ConfigError, match="--config applies to `rtunnel serve` and `rtunnel dial`"):
        parse("--config", str(path), "status")


@pytest.mark.parametrize(
    ("argv", "prog", "typo", "meant"),
    [
        (["dial", "ws://r:1", "--upstrem", "5000"], "rtunnel dial", "--upstrem", "--upstream"),
        (["dial", "ws://r:1", "--upstream", "5", "--alow", "GET /"], "rtunnel dial", "--alow", "--allow"),
        (["serve", "--htp", "127.0.0.1:0"], "rtunnel serve", "--htp", "--http"),
        (["serve", "--agnets=127.0.0.1:0"], "rtunnel serve", "--agnets", "--agents"),
        (["serve", "--log-levle", "debug"], "rtunnel serve", "--log-levle", "--log-level"),
        (["status", "--admn", "9180"], "rtunnel status", "--admn", "--admin"),
        (["cert", "--hots", "relay.example.com"], "rtunnel cert", "--hots", "--host"),
        (["--log-levl", "debug", "serve"], "rtunnel", "--log-levl", "--log-level"),
    ],
)
def test_mistyped_option_gets_a_suggestion(
    capsys: pytest.CaptureFixture[str], argv: list[str], prog: str, typo: str, meant: str
) -> None:
    # Checked before argparse's own complaints: `dial` without --upstream would otherwise only say that.
    line = usage_error(capsys, *argv)
    assert line == f"{prog}: error: unrecognized option {typo} (did you mean {meant}?) (see {prog} --help)"


def test_option_of_another_subcommand_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error(capsys, "serve", "--insecure")
    assert "unrecognized option --insecure (an option of `rtunnel dial`)" in line


def test_every_option_has_help_that_shows_its_default() -> None:
    parser = cli.build_parser()
    problems = []
    for name, sub in {"": parser, **subparsers(parser)}.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            what = f"rtunnel {name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                problems.append(f"{what}: no help text")
                continue
            if action.option_strings and not isinstance(
                action, argparse._StoreTrueAction | argparse._VersionAction
            ):
                helped = " ".join(sub._get_formatter()._expand_help(action).split())  # type: ignore[attr-defined]
                if "default" not in helped and "required" not in helped:
                    problems.append(f"{what}: help does not say its default: {helped!r}")
                elif action.default not in (None, [], argparse.SUPPRESS) and str(action.default) not in text:
                    shown = (
                        f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
                    )
                    if isinstance(action.default, int) and action.default and action.default % 1024 == 0:
                        shown = f"({shown}|{action.default // 1024}K)"  # a size may be shown as 64K
                    if not re.search(f"default {shown}", text):
                        problems.append(f"{what}: default {action.default!r} not shown in --help")
    assert not problems, "\n".join(problems)


def test_serve_help_shows_the_listener_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("serve", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "where HTTP clients connect (port 0: any) (default 127.0.0.1:8080)" in text
    assert "where agents connect (port 0: any) (default 127.0.0.1:8443)" in text


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("5000", "http://127.0.0.1:5000"),
        ("10.0.0.7:8000", "http://10.0.0.7:8000"),
        ("service.internal:80", "http://service.internal:80"),
        ("[::1]:5000", "http://[::1]:5000"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://x:1", "https://x:1"),  # left for the agent's own check, which refuses it
    ],
)
def test_upstream_port_or_host_port_means_http(given: str, url: str) -> None:
    assert upstream_url(given) == url
    assert parse("dial", "ws://r:1", "--upstream", given).upstream == url
