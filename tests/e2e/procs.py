"""Run the real ``rtunnel`` CLI (and the upstream script) as subprocesses under trio.

    async with run_relay(token) as relay:                    # waits for "listening http=... agents=..."
        async with run_agent(relay.agents_url, upstream.url, token=token, allow=["GET /api/*"]) as agent:
            ...                                               # waited for "connected to"

    with relay_ports() as ports:                              # two ports kept ours for the whole block
        async with run_relay(token, **ports) as relay, run_agent(relay.agents_url, ...) as agent:
            mark = agent.mark()
            relay.kill()                                      # SIGKILL; its exit code is no longer checked
            async with run_relay(token, **ports) as relay2:   # the same ports: nobody took them meanwhile
                await agent.wait_for_line("connected to", since=mark)

On leaving the block: SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL; the exit code must be
``expect_returncode`` (0 by default; None = don't check; a killed process is never checked). A wrong exit code
raises :class:`ProcessFailed` unless the block is already raising. The captured stderr is printed when the
block ends (pytest shows it for failing tests) and stays readable with ``log_text()``. Set
``RTUNNEL_E2E_ECHO=1`` to see the processes' stderr live on ours.

Every wait runs under fail_after (DEFAULT_TIMEOUT), and fails at once if the process exits first.
"""

# ASYNC109 (timeout parameters) is off on purpose: the brief for these helpers is that every wait has a
# built-in fail_after, so a broken product fails a test in seconds instead of hanging it.
# ruff: noqa: ASYNC109

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Final, TypedDict, TypeVar

import httpx
import trio

from ..ports import reserved_port
from ..trio_helpers import unwrap_single

__all__ = [
    "DEFAULT_TIMEOUT",
    "REFUSED_TOKEN_RE",
    "REPO_ROOT",
    "RTUNNEL_CMD",
    "STOP_TIMEOUT",
    "Agent",
    "ManagedProcess",
    "ProcessFailed",
    "Relay",
    "UpstreamProcess",
    "http_client",
    "new_token",
    "relay_ports",
    "run_agent",
    "run_process",
    "run_relay",
    "run_upstream_process",
    "wait_counts",
]

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
RTUNNEL_CMD: Final[tuple[str, ...]] = (sys.executable, "-m", "rtunnel")
UPSTREAM_MODULE: Final = "tests.e2e.upstream"
DEFAULT_TIMEOUT: Final = 15.0
STOP_TIMEOUT: Final = 10.0
LISTENING_RE: Final = re.compile(r"listening http=(\S+):(\d+) agents=(\S+):(\d+)")
# An agent's line for a relay that refused its token. Never wait for a bare "401": a line logged at
# hh:mm:ss,401 matches it.
REFUSED_TOKEN_RE: Final = re.compile(r"refused the connection \(401 ")
_ECHO: Final = os.environ.get("RTUNNEL_E2E_ECHO") == "1"


class ProcessFailed(AssertionError):
    """A managed process exited when it should not have, or with the wrong code, or a wait timed out."""


class ManagedProcess:
    """A running child with its stdout and stderr drained into lists of lines."""

    def __init__(self, name: str, args: Sequence[str], proc: trio.Process) -> None:
        self.name = name
        self.args = list(args)
        self.proc = proc
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self.killed = False
        self.expect_returncode: int | None = 0
        self._changed = trio.Event()
        self._open_streams = 2

    # --- reading output ---------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def log_text(self) -> str:
        """Everything the process wrote to stderr so far."""
        return "".join(line + "\n" for line in self.stderr_lines)

    def stdout_text(self) -> str:
        return "".join(line + "\n" for line in self.stdout_lines)

    def mark(self, stream: str = "stderr") -> int:
        """The number of lines so far: pass it as ``since=`` to wait only for lines written later."""
        return len(self._lines(stream))

    def count_lines(self, pattern: str | re.Pattern[str], *, since: int = 0, stream: str = "stderr") -> int:
        return sum(1 for line in self._lines(stream)[since:] if _search(pattern, line))

    async def wait_count(
        self, pattern: str | re.Pattern[str], n: int, *, since: int = 0, timeout: float = DEFAULT_TIMEOUT
    ) -> int:
        """Wait until at least ``n`` stderr lines from ``since`` on match, and return how many do. For access
        lines: those are buffered, up to 100 ms after their exchange ended."""
        (count,) = await wait_counts([self], pattern, n, since=since, timeout=timeout)
        return count

    async def wait_for_line(
        self,
        pattern: str | re.Pattern[str],
        *,
        since: int = 0,
        stream: str = "stderr",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> re.Match[str]:
        """First line at index >= ``since`` containing ``pattern`` (a substring, or a regex searched).

        Raises ProcessFailed if the output ends (the process died) or ``timeout`` passes first.
        """
        lines = self._lines(stream)
        index = since
        try:
            with trio.fail_after(timeout):
                while True:
                    while index < len(lines):
                        if match := _search(pattern, lines[index]):
                            return match
                        index += 1
                    if self._open_streams == 0:
                        with trio.move_on_after(2):  # the output ended: let the exit be reaped
                            await self.proc.wait()
                        raise ProcessFailed(
                            self._report(f"exited (code {self.proc.returncode}) before {pattern!r}")
                        )
                    await self._changed.wait()
        except trio.TooSlowError:
            raise ProcessFailed(self._report(f"no line matching {pattern!r} after {timeout} s")) from None

    # --- controlling --------------------------------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL now; the exit code is then not checked. ``await wait_exit()`` to reap it."""
        self.killed = True
        self.send_signal(signal.SIGKILL)

    async def wait_exit(self, *, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the process to exit on its own and return its exit code."""
        try:
            with trio.fail_after(timeout):
                return await self.proc.wait()
        except trio.TooSlowError:
            raise ProcessFailed(self._report(f"still running after {timeout} s")) from None

    async def terminate(self, *, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL (and raise ProcessFailed: it did not stop)."""
        self.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout):
            return await self.proc.wait()
        self.kill()
        await self.proc.wait()
        raise ProcessFailed(self._report(f"ignored SIGTERM for {timeout} s; killed"))

    # --- internals -------------------------------------------------------------------------------------

    def _lines(self, stream: str) -> list[str]:
        if stream == "stderr":
            return self.stderr_lines
        if stream == "stdout":
            return self.stdout_lines
        raise ValueError(f"stream must be 'stderr' or 'stdout', not {stream!r}")

    def _report(self, what: str) -> str:
        return (
            f"{self.name} (pid {self.pid}) {what}\n  command: {' '.join(self.args)}\n"
            f"--- stderr ---\n{self.log_text()}--- stdout ---\n{self.stdout_text()}"
        )

    async def _drain(self, pipe: trio.abc.ReceiveStream, lines: list[str], label: str) -> None:
        """Read a pipe to EOF, splitting lines (a pipe nobody reads would block the child when full)."""
        pending = b""
        try:
            while data := await pipe.receive_some(65536):
                *complete, pending = (pending + data).split(b"\n")
                for raw in complete:
                    self._add_line(lines, raw, label)
            if pending:
                self._add_line(lines, pending, label)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._open_streams -= 1
            self._notify()

    def _add_line(self, lines: list[str], raw: bytes, label: str) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        lines.append(line)
        if _ECHO:
            print(f"[{self.name} {label}] {line}", file=sys.stderr, flush=True)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


P = TypeVar("P", bound=ManagedProcess)


class BindArgs(TypedDict):
    http: str
    agents: str


@contextmanager
def relay_ports() -> Iterator[BindArgs]:
    """``run_relay(token, **ports)`` as often as needed in the block: always on the same two ports, which no
    other process can be given between a relay's exit and the next one's start (see ports.reserved_port)."""
    with reserved_port() as http, reserved_port() as agents:
        yield {"http": f"127.0.0.1:{http}", "agents": f"127.0.0.1:{agents}"}


class Relay(ManagedProcess):
    """``rtunnel serve``. The addresses are known once its ``listening`` line was seen."""

    http_host = "127.0.0.1"
    http_port = 0
    agents_host = "127.0.0.1"
    agents_port = 0
    tls = False

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{_url_host(self.http_host)}:{self.http_port}"

    @property
    def agents_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{_url_host(self.agents_host)}:{self.agents_port}"

    async def wait_listening(self, *, since: int = 0, timeout: float = DEFAULT_TIMEOUT) -> None:
        match = await self.wait_for_line(LISTENING_RE, since=since, timeout=timeout)
        self.http_host, self.agents_host = match.group(1).strip("[]"), match.group(3).strip("[]")
        self.http_port, self.agents_port = int(match.group(2)), int(match.group(4))


class Agent(ManagedProcess):
    """``rtunnel dial``."""

    async def wait_connected(self, *, since: int = 0, timeout: float = DEFAULT_TIMEOUT) -> None:
        await self.wait_for_line("connected to", since=since, timeout=timeout)


class UpstreamProcess(ManagedProcess):
    """``tests/e2e/upstream.py`` as a subprocess (for tests that kill or restart the upstream)."""

    port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def new_token() -> str:
    """A fresh agent token. The fixed prefix matters: a bare token_urlsafe starts with "-" one time in 64, and
    argparse then reads "--token -xyz" as a missing value (exit 2), which made e2e tests fail at random."""
    return "tok-" + secrets.token_urlsafe(16)


def http_client(base_url: str = "", **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client for tests: proxies from the environment ignored, a timeout so nothing hangs."""
    kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
    kwargs.setdefault("trust_env", False)
    return httpx.AsyncClient(base_url=base_url, **kwargs)


async def wait_counts(
    procs: Sequence[ManagedProcess],
    pattern: str | re.Pattern[str],
    total: int,
    *,
    since: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[int]:
    """Wait until `procs` together wrote at least `total` stderr lines matching `pattern`; each one's count."""
    with trio.move_on_after(timeout):
        while True:
            counts = [proc.count_lines(pattern, since=since) for proc in procs]
            if sum(counts) >= total:
                return counts
            await trio.sleep(0.01)
    names = ", ".join(proc.name for proc in procs)
    raise ProcessFailed(f"{names}: fewer than {total} lines matching {pattern!r} after {timeout} s: {counts}")


def _search(pattern: str | re.Pattern[str], line: str) -> re.Match[str] | None:
    if isinstance(pattern, str):
        return re.search(re.escape(pattern), line)
    return pattern.search(line)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    child = {k: v for k, v in os.environ.items() if k != "RTUNNEL_TOKEN"}
    child["PYTHONUNBUFFERED"] = "1"
    child["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    child.update(env or {})
    return child


@asynccontextmanager
async def run_process(
    cls: type[P],
    name: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    expect_returncode: int | None = 0,
    pass_fds: Sequence[int] = (),
) -> AsyncIterator[P]:
    """Start ``args`` (cwd = repo root), drain its output, stop it on exit (see the module docstring).

    ``pass_fds``: file descriptors the child inherits under the same numbers (a socket bound for it)."""
    proc = await trio.lowlevel.open_process(
        list(args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=_child_env(env),
        pass_fds=tuple(pass_fds),
    )
    managed = cls(name, args, proc)
    managed.expect_returncode = expect_returncode
    assert proc.stdout is not None and proc.stderr is not None
    stop_error: ProcessFailed | None = None
    try:
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(managed._drain, proc.stderr, managed.stderr_lines, "err")
                nursery.start_soon(managed._drain, proc.stdout, managed.stdout_lines, "out")
                try:
                    yield managed
                finally:
                    # Shielded, but every step is bounded: a cancelled test still stops its processes.
                    with trio.CancelScope(shield=True):
                        stop_error = await _stop(managed)
                        # A grandchild could keep the pipes open: don't wait for their EOF forever.
                        with trio.move_on_after(2):
                            while managed._open_streams:
                                await managed._changed.wait()
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await proc.stdout.aclose()
            await proc.stderr.aclose()
        print(f"===== {name} (pid {proc.pid}, exit {proc.returncode}) stderr =====")
        print(managed.log_text(), end="", flush=True)
    if stop_error is not None:
        raise stop_error
    if not managed.killed and expect_returncode is not None and proc.returncode != expect_returncode:
        raise ProcessFailed(managed._report(f"exited with {proc.returncode}, expected {expect_returncode}"))


async def _stop(managed: ManagedProcess) -> ProcessFailed | None:
    """SIGTERM (SIGKILL after STOP_TIMEOUT) unless it already exited; the failure to report, if any."""
    try:
        if managed.proc.returncode is None:
            await managed.terminate()
        return None
    except ProcessFailed as exc:
        return exc
    finally:
        if managed.proc.returncode is None:  # terminate() did not get to reap it
            managed.proc.kill()
            await managed.proc.wait()


@asynccontextmanager
async def run_relay(
    token: str | None = "test-token",
    *,
    http: str = "127.0.0.1:0",
    agents: str = "127.0.0.1:0",
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait_ready: bool = True,
    expect_returncode: int | None = 0,
    timeout: float = DEFAULT_TIMEOUT,
    command: Sequence[str] = RTUNNEL_CMD,
) -> AsyncIterator[Relay]:
    """``rtunnel serve --http HTTP --agents AGENTS [--token TOKEN] *extra_args``.

    ``token=None`` passes no --token (give it through ``env={"RTUNNEL_TOKEN": ...}`` or extra_args).
    ``wait_ready=False``: don't wait for the listening line (for startup failures: ``await relay.wait_exit()``).
    ``command`` replaces ``python -m rtunnel`` (the helpers' own tests use a fake).
    """
    args = [*command, "serve", "--http", http, "--agents", agents]
    if token is not None:
        args += ["--token", token]
    args += extra_args
    async with run_process(Relay, "relay", args, env=env, expect_returncode=expect_returncode) as relay:
        relay.tls = "--tls-cert" in extra_args
        if wait_ready:
            await relay.wait_listening(timeout=timeout)
        yield relay


@asynccontextmanager
async def run_agent(
    agents_url: str,
    upstream_url: str,
    *,
    token: str | None = "test-token",
    allow: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait_connected: bool = True,
    expect_returncode: int | None = 0,
    timeout: float = DEFAULT_TIMEOUT,
    command: Sequence[str] = RTUNNEL_CMD,
) -> AsyncIterator[Agent]:
    """``rtunnel dial AGENTS_URL --upstream UPSTREAM_URL [--token T] [--allow RULE]... *extra_args``.

    ``wait_connected=False`` for agents that should not get in (bad token: wait for a line, or wait_exit()).
    """
    args = [*command, "dial", agents_url, "--upstream", upstream_url]
    if token is not None:
        args += ["--token", token]
    for rule in allow:
        args += ["--allow", rule]
    args += extra_args
    async with run_process(Agent, "agent", args, env=env, expect_returncode=expect_returncode) as agent:
        if wait_connected:
            await agent.wait_connected(timeout=timeout)
        yield agent


@asynccontextmanager
async def run_upstream_process(
    port: int = 0, *, timeout: float = DEFAULT_TIMEOUT
) -> AsyncIterator[UpstreamProcess]:
    """``python -m tests.e2e.upstream --port PORT``; ``.port``/``.url`` once READY.

    To restart it on the same port, pass a port from ``ports.reserved_port()`` held around both runs."""
    args = [sys.executable, "-m", UPSTREAM_MODULE, "--port", str(port)]
    async with run_process(UpstreamProcess, "upstream", args) as upstream:
        match = await upstream.wait_for_line(re.compile(r"^READY (\d+)$"), stream="stdout", timeout=timeout)
        upstream.port = int(match.group(1))
        yield upstream
