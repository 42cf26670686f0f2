"""Every shell example of README.md and docs/, run as written.

Each ```sh block is claimed below: run here (in a fresh directory, with `rtunnel`, `python3` and `python` this
interpreter's, and ports of its own in place of the fixed ones the text uses), or run by another named test, or, for
the benchmark alone, named as not run with the reason. A block nobody claims fails the first test, so a new
example cannot go untested. A block that starts servers in the background is one shell script: its background
jobs are stopped (SIGTERM) when the script ends, as they would be when a reader closes the terminal.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..ports import reserved_port
from .procs import REPO_ROOT

pytestmark = pytest.mark.e2e

PAGES = ("README.md", *sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "docs").glob("*.md")))
FIXED_PORTS = re.compile(r"\b(5000|5001|8080|8081|8443|8444|9180|9181)\b")
# A guard against a hang, not a threshold: the slowest example (the conformance runs) takes a few seconds.
SCRIPT_TIMEOUT = 120
# Examples spend most of their time waiting (for curl's next retry, for a service's next tick): a few run at
# once, which the two cores of the slowest machine bear.
PARALLEL = 3


def sh_blocks(page: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", (REPO_ROOT / page).read_text(), re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Example:
    """Blocks of `page` (each found by a line only it has) run as one script, and what its output shows."""

    page: str
    markers: tuple[str, ...]
    expect: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{Path(self.page).stem}:{self.markers[0][:40]}"


EXAMPLES = (
    Example(
        "docs/configuration.md",
        ("rtunnel serve --config relay.toml &",),
        ('{"items": []}',),
    ),
    Example(
        "docs/operations.md",
        (
            "rtunnel dial ws://127.0.0.1:8443 --upstream 5000 --admin 9181 &",
            "rtunnel status --admin http://127.0.0.1:9180",
            "X-Request-Id: order-1234",
        ),
        (
            '{"items": []}',
            "HTTP/1.1 200",
            "rtunnel_agents_connected 1.0",
            "1 agent connected",
            "x-request-id: order-1234",
        ),
    ),
    Example("docs/operations.md", ("RTUNNEL_ADMIN_TOKEN=$(rtunnel token)",), ('"process"', "401")),
    Example(
        "docs/operations.md",
        ("rtunnel dial ws://127.0.0.1:8443 ws://127.0.0.1:8444",),
        ('{"items": []}\n{"items": []}',),
    ),
    Example(
        "docs/operations.md",
        ("--proxy-protocol &",),
        ('{"items": []}', "no PROXY header: connection closed"),
    ),
    Example("docs/operations.md", ("rtunnel completion bash >",)),
    Example("docs/http.md", ("--allow 'GET /chat' &",), ("hello through the tunnel",)),
    Example("docs/http.md", ("Ticks(http.server.BaseHTTPRequestHandler)",), ("data: tick 0", "data: tick 2")),
    Example(
        "docs/tunnels.md",
        ("--tunnel shop=host:shop.localhost --tunnel api=prefix:/api &",),
        ("shop home", '{"users": []}', "404 Not Found", "no tunnel on this relay serves"),
    ),
    Example(
        "docs/security.md",
        ("rtunnel cert --host relay.example.com --host 192.0.2.10 --out tls",),
        ("for relay.example.com, 192.0.2.10", "--ca ca.pem", "-rw------- 1", "relay-key.pem"),
    ),
    Example("docs/apps.md", ("--app web:app",), ("hello from inside the agent",)),
    Example("docs/conformance.md", ("python -m rtunnel.conformance relay",), ("conformance: MUST",)),
    Example("docs/conformance.md", ("python -m rtunnel.conformance agent",), ("conformance: MUST",)),
)
# Blocks another test runs as written.
ELSEWHERE = {
    ("README.md", ".venv/bin/rtunnel demo"): "tests/e2e/test_cli.py",  # test_demo; the install is .ci/run's
    ("README.md", ".venv/bin/python -m pytest"): ".ci/run",
    ("README.md", "rtunnel cert --host relay.example.com --out tls"): "tests/e2e/test_quickstart.py",
    ("README.md", "rtunnel dial wss://relay.example.com:8443"): "tests/e2e/test_quickstart.py",
    ("README.md", "curl http://relay.example.com:8080/api/items"): "tests/e2e/test_quickstart.py",
}
# Blocks no test can run as written, and why.
NOT_RUN = {
    ("docs/performance.md", "bench/run.py"): "the benchmark: minutes long, installs packages",
    (
        "docs/operations.md",
        "docker build -t rtunnel .",
    ): "needs a Docker daemon (test_deploy checks the file)",
}


def claims() -> Iterator[tuple[str, str, str]]:
    for example in EXAMPLES:
        for marker in example.markers:
            yield example.page, marker, example.id
    for (page, marker), owner in ELSEWHERE.items():
        yield page, marker, owner
    for page, marker in NOT_RUN:
        yield page, marker, "not run"


def test_every_shell_example_is_claimed_once() -> None:
    claimed: dict[tuple[str, int], list[str]] = {}
    for page, marker, owner in claims():
        hits = [i for i, block in enumerate(sh_blocks(page)) if marker in block]
        assert len(hits) == 1, f"{page}: {marker!r} is in {len(hits)} shell blocks, not one"
        claimed.setdefault((page, hits[0]), []).append(owner)
    for page in PAGES:
        for i, block in enumerate(sh_blocks(page)):
            owners = claimed.get((page, i), [])
            assert len(owners) == 1, f"{page}, shell block {i + 1} is claimed by {owners}:\n{block}"
    for owner in ELSEWHERE.values():
        assert (REPO_ROOT / owner).exists(), owner


def localize(script: str, ports: ExitStack) -> str:
    """The only changes to the text: ports of the test's own for the fixed ones (reserved for as long as
    `ports` is open, see tests/ports.py), and loopback for 0.0.0.0."""
    fixed = sorted(set(FIXED_PORTS.findall(script)))
    mine = {port: str(ports.enter_context(reserved_port())) for port in fixed}
    return FIXED_PORTS.sub(lambda m: mine[m.group(1)], script.replace("0.0.0.0:", "127.0.0.1:"))


def shell_env(tmp_path: Path) -> dict[str, str]:
    """`rtunnel`, `python3` and `python` as the examples call them: this interpreter's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, command in (("rtunnel", "-m rtunnel"), ("python3", ""), ("python", "")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {command} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTUNNEL_")}
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "HOME": str(tmp_path)}
    return env


def run_script(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    work = tmp_path / "work"
    work.mkdir()
    # Background jobs get SIGTERM when the script ends, however it ends, and the script waits for them.
    prologue = "set -eu\ntrap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT\n"
    proc = subprocess.Popen(
        [shutil.which("bash") or "/bin/bash", "-c", prologue + script],
        cwd=work,
        env=shell_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        out += f"\n(killed: the example did not finish in {SCRIPT_TIMEOUT} s)"
        return subprocess.CompletedProcess(proc.args, -9, out, err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_example(example: Example, tmp_path: Path) -> tuple[str, subprocess.CompletedProcess[str]]:
    blocks = sh_blocks(example.page)
    script = "\n".join(next(b for b in blocks if marker in b) for marker in example.markers)
    with ExitStack() as ports:
        return script, run_script(localize(script, ports), tmp_path)


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Example, Future[tuple[str, subprocess.CompletedProcess[str]]]]]:
    """The selected examples, started a few at a time as soon as the first of them is needed."""
    selected = [
        item.callspec.params["example"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_example_runs_as_written"
    ]
    with ThreadPoolExecutor(PARALLEL) as pool:
        yield {e: pool.submit(run_example, e, tmp_path_factory.mktemp("example")) for e in selected}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_example_runs_as_written(
    example: Example, runs: dict[Example, Future[tuple[str, subprocess.CompletedProcess[str]]]]
) -> None:
    if not shutil.which("curl"):
        if os.environ.get("CI"):
            pytest.fail("curl is missing (.ci/run installs it)")
        pytest.skip("needs curl")
    script, result = runs[example].result()
    report = f"{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, report
    for text in example.expect:
        assert text.lower() in result.stdout.lower(), (text, report)
    assert "Traceback" not in result.stderr, report
