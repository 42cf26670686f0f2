"""py-spy profiles of the relay and the agent for bench/run.py --profile (py-spy is not a project dependency).

Samples are wall-clock stacks of the running thread (py-spy's default leaves out threads it sees idle). Two
caveats when reading the shares: trio's epoll wait is not always recognised as idle, so a process that waits a lot
shows a large `trio/_core/_io_epoll.py:get_events`; and on loopback a socket send runs the receiver's TCP work
and wakes it, so with every process on two CPUs, time spent preempted inside send() is counted as send time.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import sys
from pathlib import Path

_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def find_py_spy() -> str | None:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("py-spy", path=search)


def record_args(py_spy: str, pid: int, seconds: float, out: Path) -> list[str]:
    """py-spy sampling `pid` for `seconds` into `out` (collapsed stacks: one "frame;frame;... count" a line)."""
    args = [py_spy, "record", "--rate", "100", "--duration", f"{seconds:g}", "--format", "raw"]
    return [*args, "--output", str(out), "--pid", str(pid)]


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    function, file = match.groups()
    file = re.sub(r".*/site-packages/", "", file)
    file = re.sub(r".*/lib/python3\.\d+/", "", file)
    file = re.sub(rf"^{re.escape(str(Path(__file__).resolve().parents[1]))}/", "", file)
    return f"{file}:{function}"


def _area(name: str) -> str:
    file = name.split(":", 1)[0]
    if file.startswith("trio/_socket.py"):
        return "socket calls (trio/_socket.py)"
    if file.startswith("trio/_core/_io_epoll.py"):
        return "epoll wait/poll (trio/_core/_io_epoll.py)"
    if file.startswith("trio/_core"):
        return "trio scheduler and cancel scopes (trio/_core)"
    for package in (
        "h11/",
        "wsproto/",
        "trio_websocket/",
        "protocol/",
        "logging/",
        "trio/",
        "prometheus_client/",
    ):
        if file.startswith(package):
            return package
    return file if file.startswith("rtunnel/") else "other (stdlib, outcome, attrs, ...)"


def summarize(raw: Path, top: int = 12) -> str:
    """The top functions by self time, and self time grouped by package/file, as shares of all samples."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        total += int(samples)
        if frames:
            own[_name(frames[-1])] += int(samples)
    if not total:
        return f"{raw.name}: no samples"
    areas: collections.Counter[str] = collections.Counter()
    for name, count in own.items():
        areas[_area(name)] += count
    lines = [f"{raw.stem}: {total} samples; self time by area:"]
    lines += [f"  {100 * c / total:5.1f}%  {a}" for a, c in areas.most_common(top)]
    lines.append("  top functions (self):")
    lines += [f"  {100 * c / total:5.1f}%  {n}" for n, c in own.most_common(top)]
    return "\n".join(lines)
