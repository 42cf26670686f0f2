"""The load generators of bench/run.py: wrk for requests, curl for bulk transfers, a download loop."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from procs import BenchError, Processes, run, signal_group


@dataclass
class Wrk:
    rps: float
    p50: float  # ms
    p99: float
    requests: int


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk(url: str, connections: int, seconds: float) -> Wrk:
    """One `wrk -t1` run; any socket error or non-2xx answer fails the measurement."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "--latency", url]
    out = run(args, timeout=seconds + 60)
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx or (errors and errors.group(1).strip() != "connect 0, read 0, write 0, timeout 0"):
        raise BenchError(f"wrk {url} -c{connections}: errors:\n{out}")

    def latency(pct: str) -> float:
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
        if not match:
            raise BenchError(f"wrk output without {pct}%:\n{out}")
        return float(match.group(1)) * _UNITS[match.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise BenchError(f"unexpected wrk output:\n{out}")
    return Wrk(float(rps.group(1)), latency("50"), latency("99"), int(total.group(1)))


def curl_download(url: str, size: int) -> float:
    """MB/s (10^6 bytes) of one download to /dev/null."""
    out = run(["curl", "-s", "-o", "/dev/null", "--max-time", "300", "-w", "%{http_code} %{size_download} %{speed_download}", url], timeout=320)  # fmt: skip
    code, got, speed = out.split()
    if code != "200" or int(got) != size:
        raise BenchError(f"download {url}: status {code}, {got} of {size} bytes")
    return float(speed) / 1e6


def curl_upload(url: str, source: Path, size: int, upload_log: Path) -> float:
    """MB/s of one upload (POST, Content-Length); nginx's log line proves the bytes arrived."""
    before = upload_log.read_text().splitlines() if upload_log.exists() else []
    args = ["curl", "-s", "-o", "/dev/null", "--max-time", "300", "-X", "POST", "-T", str(source), "-H", "Expect:"]  # fmt: skip
    out = run([*args, "-w", "%{http_code} %{size_upload} %{speed_upload}", url], timeout=320)
    code, sent, speed = out.split()
    # nginx logs the request after it answered: under load curl may be done before the line is written.
    deadline = time.monotonic() + 5
    while True:
        after = upload_log.read_text().splitlines() if upload_log.exists() else []
        if len(after) > len(before) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    received = int(after[-1].split()[0]) if len(after) > len(before) else 0
    if code != "204" or int(sent) != size or received < size:
        raise BenchError(
            f"upload {url}: status {code}, sent {sent}, nginx received {received} of {size} bytes"
        )
    return float(speed) / 1e6


class BulkLoop:
    """Downloads the big file over and over (one curl at a time) until stopped: the load for the fairness test."""

    def __init__(self, url: str, procs: Processes) -> None:
        self.url = url
        self.procs = procs
        self.done = 0
        self._stop = threading.Event()
        self._current: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._current = self.procs.start("bulkloop", ["curl", "-s", "-o", "/dev/null", self.url])
            self._current.wait()
            self.done += 1

    def __enter__(self) -> BulkLoop:
        self._thread.start()
        time.sleep(0.5)  # let the transfer reach full speed
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._current is not None:
            signal_group(self._current, signal.SIGKILL)
        self._thread.join()
        self.procs.started = [(n, p) for n, p in self.procs.started if n != "bulkloop" or p.poll() is None]

    @property
    def running(self) -> bool:
        return self._current is not None and self._current.poll() is None
