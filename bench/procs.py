"""Process bookkeeping for bench/run.py: start in own process groups, stop them all, read /proc."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A setup step or a measurement failed; the message says which."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with status {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{name}: nothing listening on 127.0.0.1:{port} after {timeout:g} s")


def run(args: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """The command's stdout; BenchError (with the end of its stderr) if it fails."""
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=cwd
    )
    if result.returncode != 0:
        raise BenchError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return result.stdout


class Processes:
    """Every process the run starts, each in its own process group, stopped in reverse order at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.extra_pids: set[int] = set()  # sshd's per-connection children leave our process groups

    def start(
        self,
        name: str,
        args: list[str],
        *,
        stdin: int = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115  (the child keeps it)
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=stdin, env=env, cwd=cwd, start_new_session=True
        )
        log.close()
        self.started.append((name, proc))
        return proc

    def log_text(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text("utf-8", "replace")

    def wait_line(
        self, name: str, proc: subprocess.Popen[bytes], pattern: str, timeout: float = 20
    ) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log_text(name))
            if match:
                return match
            if proc.poll() is not None:
                raise BenchError(f"{name} exited ({proc.returncode}):\n{self.log_text(name)[-2000:]}")
            time.sleep(0.05)
        raise BenchError(f"{name}: no line matching {pattern!r} within {timeout:g} s")

    def stop_all(self) -> None:
        for name, proc in reversed(self.started):
            if name == "sshd":
                self.extra_pids.update(descendants(proc.pid))
            signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc in reversed(self.started):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait()
        for pid in self.extra_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.started.clear()


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (threads included), from /proc/PID/stat."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def system_busy() -> float:
    """CPU seconds the whole machine spent in user, nice and system mode so far (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:4]
    return sum(int(x) for x in fields) / CLK_TCK


def own_busy() -> float:
    """CPU seconds used by this script and every process it started (live or already reaped)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total + cpu_seconds(descendants(os.getpid()))


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) from /proc/PID/status, in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values
