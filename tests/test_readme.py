"""README's numbers are the code's numbers: the limits it documents and the defaults of its option tables."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from protocol import Limits, Settings
from rtunnel.cli import commands as cli
from rtunnel.cli.parse import _size, subparsers
from rtunnel.http.target import DEFAULT_MAX_TARGET_LENGTH
from rtunnel.link.wslink import MAX_MESSAGE_SIZE
from rtunnel.relay.exchange import MAX_CHUNK_LINE, HttpLimits
from rtunnel.relay.server import FRAME_SIZE, STREAM_WINDOW, RelayConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def size(text: str) -> int:
    """'16 MiB + 64 KiB' -> bytes."""
    total = 0
    for number, unit in re.findall(r"([\d,]+) (B|KiB|MiB|GiB)", text):
        total += int(number.replace(",", "")) * UNITS[unit]
    assert total, text
    return total


def number(text: str) -> float:
    match = re.match(r"([\d,.]+)", text)
    assert match is not None, text
    return float(match.group(1).replace(",", ""))


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_relay_limits_table_matches_the_code() -> None:
    limits, relay = HttpLimits(), RelayConfig()
    dial_streams = next(
        a.default for a in subparsers(cli.build_parser())["dial"]._actions if a.dest == "max_streams"
    )
    dead_timeout = next(
        a.default for a in subparsers(cli.build_parser())["serve"]._actions if a.dest == "dead_timeout"
    )
    expected: dict[str, float | None] = {
        "`--max-head-size`": limits.max_head_size,
        "`--max-headers`": limits.max_header_count,
        "`--max-body-size`": limits.max_body_size,
        "`--head-timeout`": limits.head_timeout,
        "`--idle-timeout`": limits.idle_timeout,
        "`--body-timeout`": limits.body_timeout,
        "`--max-connections`": limits.max_connections,
        "`--max-connections-per-ip`": limits.max_connections_per_ip,
        "`--max-exchanges-per-ip`": limits.max_exchanges_per_ip,
        "`--max-buffered`": limits.max_buffered_bytes,
        "`rtunnel dial --max-streams`": dial_streams,
        "`--stall-timeout`": relay.stall_timeout,
        "`--dead-timeout`": dead_timeout,
    }
    rows = {row[1]: row[2] for row in table_rows(section("Security model")) if len(row) == 4}
    for option, value in expected.items():
        documented = rows[option]
        if value is None:
            assert documented.startswith("unlimited"), (option, documented)
        elif "KiB" in documented or "MiB" in documented:
            assert size(documented) == value, (option, documented, value)
        else:
            assert number(documented) == value, (option, documented, value)
    fail_limit, fail_window = re.fullmatch(
        r"(\d+) in (\d+) s", rows["`--auth-fail-limit` in `--auth-fail-window`"]
    ).groups()  # type: ignore[union-attr]
    assert (int(fail_limit), float(fail_window)) == (relay.auth_fail_limit, relay.auth_fail_window)
    fixed = {
        row[0]: row[2]
        for row in table_rows(section("Security model"))
        if len(row) == 4 and row[1] == "(fixed)"
    }
    assert size(fixed["WebSocket message"]) == MAX_MESSAGE_SIZE
    assert size(fixed["chunk-size line / trailer section"]) == MAX_CHUNK_LINE
    assert size(fixed["request-target (agent)"]) == DEFAULT_MAX_TARGET_LENGTH


def test_protocol_limits_match_the_code() -> None:
    text = " ".join(section("Security model").split())
    text = text[text.index("Protocol limits") :]
    settings, limits = Settings(), Limits()

    def documented(pattern: str) -> tuple[str, ...]:
        match = re.search(pattern, text)
        assert match is not None, pattern
        return match.groups()

    # Both ends of rtunnel accept frames this large (the protocol's own default is 16 KiB).
    assert size(documented(r"frame payload ([\d,]+ \w+)")[0]) == FRAME_SIZE
    assert size(documented(r"head ([\d,]+ \w+) \(`MAX_HEAD_SIZE`\)")[0]) == settings.max_head_size
    # Both ends of rtunnel grant this window (the protocol's own default differs).
    assert size(documented(r"stream window ([\d,]+ \w+)")[0]) == STREAM_WINDOW
    assert size(documented(r"connection window ([\d,]+ \w+)")[0]) == settings.connection_window
    for frames, burst, rate in (
        ("PING", limits.ping_burst, limits.ping_rate),
        ("RESET and refused/malformed OPEN", limits.reset_burst, limits.reset_rate),
        ("empty DATA", limits.empty_frame_burst, limits.empty_frame_rate),
        ("WINDOW_UPDATE", limits.window_update_burst, limits.window_update_rate),
    ):
        got = documented(re.escape(frames) + r" burst ([\d,]+) then ([\d,]+)/s")
        assert (number(got[0]), number(got[1])) == (burst, rate), frames
    assert number(documented(r"([\d,]+) unread control frames")[0]) == limits.max_control_queue


def _option_defaults(command: str) -> dict[str, argparse.Action]:
    """The options of `command` by name; a global option repeated on it has its default on the top level."""
    parser = cli.build_parser()
    return {
        name: action
        for owner in (subparsers(parser)[command], parser)
        for action in owner._actions
        if action.default is not argparse.SUPPRESS
        for name in action.option_strings
    }


@pytest.mark.parametrize("command", ["serve", "dial"])
def test_option_tables_show_the_parsers_defaults(command: str) -> None:
    heading = "### `rtunnel serve`" if command == "serve" else "### `rtunnel dial"
    start = README.index(heading)
    rows = table_rows(README[start : README.index("\n#", start + 1)])
    actions = _option_defaults(command)
    checked = 0
    for option_cell, default, *_ in rows[1:]:
        options = re.findall(r"`(--[a-z-]+)", option_cell)
        values = [v.strip() for v in default.strip("`").split(",")]
        if len(values) != len(options):
            continue  # a row about several options with one description ("see Security model")
        for option, value in zip(options, values, strict=True):
            action = actions[option]
            if isinstance(action.default, float | int) and not isinstance(action.default, bool):
                documented = _size(value) if value[-1:] in ("K", "M", "G") else number(value)
                assert documented == action.default, (option, value, action.default)
                checked += 1
            elif isinstance(action.default, str):
                assert value.strip("`") == action.default, (option, value, action.default)
                checked += 1
    assert checked >= 6, rows  # the table was found and read
