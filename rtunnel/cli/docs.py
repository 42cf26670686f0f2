"""docs/cli.md, generated from the argument parser, so that the manual's option reference cannot drift from
`rtunnel --help`: `python -m rtunnel.cli.docs > docs/cli.md` writes it, and a test checks the committed page."""

from __future__ import annotations

import argparse
import re
import sys
from typing import cast

from .parse import build_parser, subparsers

__all__ = ["render"]

COMMAND = "python -m rtunnel.cli.docs > docs/cli.md"
USAGE_WIDTH = 100

PREAMBLE = f"""\
# Command line

Every `rtunnel` command and option with its default, as `rtunnel COMMAND --help` prints them. This page is
generated from the argument parser (`{COMMAND}`): edit the parser, not the page. What
the options do in practice is told elsewhere in the manual: [configuration](configuration.md) (config files,
environment, exit statuses), [operations](operations.md), [HTTP behaviour](http.md),
[named tunnels](tunnels.md), [security](security.md), [in-process apps](apps.md).
"""


def _escape(text: str) -> str:
    """Markdown for a table cell: environment variables as code; `|`, `*`, `_` and `<` literal elsewhere."""
    parts = re.sub(r"(\$[A-Z_<>]+[A-Z])", r"`\1`", text).split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside backticks
        parts[i] = re.sub(r"([\\|*_])", r"\\\1", parts[i]).replace("<", "&lt;")
    return "`".join(parts)


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    """The parser's own formatter (it adds the defaults to the help), at a width that does not depend on the
    terminal the page is generated in."""
    return cast(type[argparse.HelpFormatter], parser.formatter_class)(parser.prog, width=USAGE_WIDTH)


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage line, built here rather than by argparse, whose wrapping differs between Python versions."""
    formatter = _formatter(parser)
    words = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if not action.option_strings:
            words.append(formatter._format_args(action, action.dest))
            continue
        word = action.option_strings[-1]
        if action.nargs != 0:
            word += " " + formatter._format_args(action, action.dest.upper())
        words.append(word if action.required else f"[{word}]")
    prefix = f"usage: {parser.prog}"
    lines = [prefix]
    for word in words:  # never broken inside: `[--max-head-size BYTES]` stays on one line
        if len(lines[-1]) + 1 + len(word) > USAGE_WIDTH:
            lines.append(" " * len(prefix))
        lines[-1] += " " + word
    return "\n".join(lines)


def _rows(parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> list[str]:
    formatter = _formatter(parser)
    rows = []
    for action in actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                rows.append(f"| `{choice.dest}` | {_escape(choice.help or '')} |")
            continue
        invocation = formatter._format_action_invocation(action)
        rows.append(f"| `{invocation}` | {_escape(formatter._expand_help(action))} |")
    return rows


def _command(parser: argparse.ArgumentParser, title: str, summary: str) -> list[str]:
    lines = [f"## `{title}`", ""]
    if summary:
        lines += [summary[:1].upper() + summary[1:].rstrip(".") + ".", ""]
    lines += ["```text", _usage(parser), "```", ""]
    for group in parser._action_groups:
        rows = _rows(parser, group._group_actions)
        if not rows:
            continue
        lines += [f"**{group.title}**", "", "| argument | meaning |", "|---|---|", *rows, ""]
    return lines


def render(parser: argparse.ArgumentParser | None = None) -> str:
    parser = parser or build_parser()
    commands = subparsers(parser)
    summaries = {
        choice.dest: choice.help or ""
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action._choices_actions
    }
    toc = ["- [`rtunnel`](#rtunnel)", *(f"- [`rtunnel {name}`](#rtunnel-{name})" for name in commands)]
    lines = [PREAMBLE, *toc, ""]
    lines += _command(parser, "rtunnel", parser.description or "")
    for name, sub in commands.items():
        lines += _command(sub, f"rtunnel {name}", summaries[name])
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
