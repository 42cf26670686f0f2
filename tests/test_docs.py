"""The manual says what the code does: docs/cli.md is the parser's, the limits in docs/http.md are the code's,
and every link between README.md and the pages of docs/ leads somewhere. (tests/e2e/test_docs_examples.py runs
their shell examples.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol import Limits, Settings
from rtunnel.cli import commands as cli
from rtunnel.cli.docs import COMMAND, render
from rtunnel.cli.parse import subparsers
from rtunnel.http.target import DEFAULT_MAX_TARGET_LENGTH
from rtunnel.link.wsterms import MAX_MESSAGE_SIZE
from rtunnel.relay.limits import HttpLimits
from rtunnel.relay.server import FRAME_SIZE, STREAM_WINDOW, RelayConfig
from rtunnel.relay.wire import MAX_CHUNK_LINE

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
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


def section(page: str, title: str) -> str:
    text = (ROOT / page).read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_the_command_line_page_is_the_parsers() -> None:
    committed = (ROOT / "docs/cli.md").read_text()
    assert committed == render(), f"docs/cli.md is not what the parser says: regenerate it with `{COMMAND}`"
    for name in subparsers(cli.build_parser()):
        assert f"## `rtunnel {name}`" in committed, name


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as dashes."""
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.*)$", re.sub(r"(?ms)^```.*?^```", "", text), re.MULTILINE)
    }


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_files_it_names_exist(page: Path) -> None:
    """`rtunnel/link/mux.py`, `tests/e2e/...`: moved or deleted files must not linger in the manual (one that is
    gone on purpose is named with the `git log -- PATH` that finds it)."""
    text = page.read_text()
    for match in re.finditer(r"`((?:rtunnel|protocol|tests|bench|deploy|docs|\.ci)/[\w./-]*)`", text):
        if not text[: match.start()].endswith("git log -- "):
            assert (ROOT / match.group(1)).exists(), (page.name, match.group(1))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_lead_somewhere(page: Path) -> None:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), (page.name, target)
        if anchor:
            assert anchor in anchors(linked.read_text()), (page.name, target)


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
    rows = {row[1]: row[2] for row in table_rows(section("docs/http.md", "Limits")) if len(row) == 4}
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
        for row in table_rows(section("docs/http.md", "Limits"))
        if len(row) == 4 and row[1] == "(fixed)"
    }
    assert size(fixed["WebSocket message"]) == MAX_MESSAGE_SIZE
    assert size(fixed["chunk-size line / trailer section"]) == MAX_CHUNK_LINE
    assert size(fixed["request-target (agent)"]) == DEFAULT_MAX_TARGET_LENGTH


def test_protocol_limits_match_the_code() -> None:
    text = " ".join(section("docs/http.md", "Limits").split())
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
