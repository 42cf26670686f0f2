"""Side-by-side benchmark: nginx direct, through `ssh -R`, and through rtunnel (relay + agent), in one run.

    python bench/run.py            # full run (~6 minutes): 3 interleaved rounds, 256 MiB bulk, 10,000 long-polls
    python bench/run.py --quick    # smoke run (~1 minute): 1 round, short loads, 32 MiB bulk, 1,000 long-polls
    python bench/run.py --serve    # start everything, print URLs and PIDs, wait for Ctrl-C (for profiling)
    python bench/run.py --profile DIR   # py-spy the relay and the agent under each load (needs py-spy)

Needs the Debian packages nginx, openssh-server, openssh-client, wrk and curl (the script says how to install
them if one is missing), and a Python with this repository's dependencies (trio, h11, trio-websocket). Everything
listens on 127.0.0.1 only, in a temporary directory that is removed at the end, and every process the script
started is stopped (each runs in its own process group) however the run ends.

Paths measured, each in front of the same nginx (bench/nginx.conf): "direct"; "ssh -N" and "ssh -tt" (`ssh -R` to
a private sshd, bench/sshd.conf; -N leaves Nagle on, -tt allocates a tty, which makes both ends set TCP_NODELAY;
the better of the two is the anchor of each figure); "rtunnel" (`rtunnel serve` + `rtunnel dial`, default
options). Each figure is measured in rounds interleaved across the paths (A B C D A B C D ...) and the table shows
the median. The scale test (long-polls) runs on its own relay + agent in front of bench/longpoll_upstream.py.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from procs import (
    BenchError,
    Processes,
    cpu_seconds,
    descendants,
    memory_kib,
    own_busy,
    signal_group,
    system_busy,
)
from pyspy import find_py_spy, record_args, summarize
from report import PATHS, Results, machine_text, scale_text, table, targets_text

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LISTENING_RE = re.compile(r"listening http=(\S+):(\d+) agents=(\S+):(\d+)")
TOOLS = {
    "nginx": "nginx",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "wrk": "wrk",
    "curl": "curl",
}
SMALL_BODY = b"0123456789abcdef" * 6 + b"rtun\n"  # 101 bytes


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


def run(args: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return result.stdout


# ---------------------------------------------------------------------------------------------------------
# the setup


@dataclass
class Path_:
    """One way to reach nginx, and the processes whose CPU time it costs."""

    name: str
    port: int
    cpu_roles: Callable[[], dict[str, list[int]]] = dict

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@dataclass
class Setup:
    tmp: Path
    procs: Processes
    tools: dict[str, str]
    bulk_size: int
    rtunnel_src: Path = ROOT  # where `python -m rtunnel` is imported from
    nginx_port: int = 0
    paths: dict[str, Path_] = field(default_factory=dict)


def find_tools() -> dict[str, str]:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = {name: shutil.which(name, path=search) for name in TOOLS}
    missing = sorted({TOOLS[name] for name, where in found.items() if where is None})
    if missing:
        raise BenchError(
            "missing tools; install them with:\n"
            f"    apt-get update && apt-get install -y --no-install-recommends {' '.join(missing)}"
        )
    return {name: where for name, where in found.items() if where is not None}


def fill_template(name: str, out: Path, **values: object) -> Path:
    text = (BENCH / name).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    out.write_text(text)
    return out


def start_nginx(s: Setup) -> None:
    www = s.tmp / "www"
    www.mkdir()
    (www / "small.txt").write_bytes(SMALL_BODY)
    block = os.urandom(1 << 20)
    (www / "16k.bin").write_bytes(block[: 16 * 1024])
    with open(www / "big.bin", "wb") as big:
        for _ in range(s.bulk_size >> 20):
            big.write(block)
    (www / "upload").write_bytes(b"")  # the static handler answers POST with 405 only for an existing file
    s.tmp.chmod(0o755)  # nginx workers run as an unprivileged user when the master is root
    s.nginx_port = free_port()
    conf = fill_template("nginx.conf", s.tmp / "nginx.conf", DIR=s.tmp, PORT=s.nginx_port)
    run([s.tools["nginx"], "-t", "-q", "-c", str(conf)], timeout=30)
    proc = s.procs.start("nginx", [s.tools["nginx"], "-c", str(conf)])
    wait_port(s.nginx_port, proc, "nginx")
    s.paths["direct"] = Path_("direct", s.nginx_port)


def start_ssh(s: Setup) -> None:
    keygen = s.tools["ssh-keygen"]
    run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(s.tmp / "ssh_host_ed25519_key")], timeout=30)
    run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(s.tmp / "id_ed25519")], timeout=30)
    shutil.copy(s.tmp / "id_ed25519.pub", s.tmp / "authorized_keys")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    sshd_port = free_port()
    conf = fill_template("sshd.conf", s.tmp / "sshd_config", DIR=s.tmp, PORT=sshd_port)
    run([s.tools["sshd"], "-t", "-f", str(conf)], timeout=30)
    sshd = s.procs.start("sshd", [s.tools["sshd"], "-D", "-e", "-f", str(conf)])
    wait_port(sshd_port, sshd, "sshd")
    user = getpass.getuser()
    for name, mode in (("ssh -N", ["-N"]), ("ssh -tt", ["-tt"])):
        port = free_port()
        args = [
            s.tools["ssh"], "-F", "/dev/null", "-p", str(sshd_port), "-i", str(s.tmp / "id_ed25519"),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
            "-R", f"127.0.0.1:{port}:127.0.0.1:{s.nginx_port}", *mode, f"{user}@127.0.0.1",
        ]  # fmt: skip
        if mode == ["-tt"]:
            args.append("exec sleep 86400")
        proc = s.procs.start(name.replace(" ", ""), args, stdin=subprocess.PIPE)
        wait_port(port, proc, name)

        def roles(client: int = proc.pid, daemon: int = sshd.pid) -> dict[str, list[int]]:
            return {"ssh+sshd": [client, *descendants(daemon)]}

        s.paths[name] = Path_(name, port, roles)


def start_rtunnel(s: Setup, upstream_port: int, name: str, streams: int = 0) -> tuple[Path_, dict[str, int]]:
    """A relay and an agent in front of 127.0.0.1:upstream_port, default options except: the relay's per-address
    abuse limits are off (all the load comes from 127.0.0.1), the agent's response timeout is long (the scale
    test holds its exchanges), and `streams` > 0 raises the agent's concurrent-stream limit to that."""
    env = dict(os.environ, PYTHONPATH=str(s.rtunnel_src), RTUNNEL_TOKEN=secrets.token_urlsafe(24))
    cmd = [sys.executable, "-m", "rtunnel"]
    serve = ["serve", "--http", "127.0.0.1:0", "--agents", "127.0.0.1:0"]
    known = run([*cmd, "serve", "--help"], timeout=30, env=env)  # options differ between versions of rtunnel
    for option in ("--max-connections", "--max-connections-per-ip", "--max-exchanges-per-ip"):
        if f"{option} " in known:
            serve += [option, "0"]
    relay = s.procs.start(f"{name}-relay", [*cmd, *serve], env=env)
    match = s.procs.wait_line(f"{name}-relay", relay, LISTENING_RE.pattern)
    http_port, agents_port = int(match.group(2)), int(match.group(4))
    dial = ["dial", f"ws://127.0.0.1:{agents_port}", "--upstream", f"http://127.0.0.1:{upstream_port}"]
    dial += ["--response-timeout", "300"]
    if streams and "--max-streams" in run([*cmd, "dial", "--help"], timeout=30, env=env):
        dial += ["--max-streams", str(streams)]
    agent = s.procs.start(f"{name}-agent", [*cmd, *dial], env=env)
    s.procs.wait_line(f"{name}-agent", agent, "connected to")
    s.procs.wait_line(f"{name}-relay", relay, "agent connected")
    pids = {"relay": relay.pid, "agent": agent.pid}
    return Path_("rtunnel", http_port, lambda: {k: [v] for k, v in pids.items()}), pids


def check_paths(s: Setup) -> None:
    for path in s.paths.values():
        body = run(["curl", "-sf", "--max-time", "10", path.url("/small.txt")], timeout=20)
        if body.encode() != SMALL_BODY:
            raise BenchError(f"{path.name}: /small.txt came back wrong: {body[:200]!r}")


# ---------------------------------------------------------------------------------------------------------
# load generators


@dataclass
class Wrk:
    rps: float
    p50: float  # ms
    p99: float
    requests: int


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk(url: str, connections: int, seconds: float) -> Wrk:
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
    args = [
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "--max-time",
        "300",
        "-X",
        "POST",
        "-T",
        str(source),
        "-H",
        "Expect:",
    ]
    out = run([*args, "-w", "%{http_code} %{size_upload} %{speed_upload}", url], timeout=320)
    code, sent, speed = out.split()
    after = upload_log.read_text().splitlines() if upload_log.exists() else []
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


# ---------------------------------------------------------------------------------------------------------
# measurements


def add(results: Results, key: str, path: str, value: float) -> None:
    results.setdefault(key, {}).setdefault(path, []).append(value)


def measure_round(s: Setup, results: Results, figure: str, seconds: float) -> None:
    """One round of one figure on every path, in the fixed order (interleaving is by the caller's loop)."""
    size = s.bulk_size
    for name in PATHS:
        path = s.paths[name]
        if figure == "small":
            roles = path.cpu_roles()
            before = {role: cpu_seconds(pids) for role, pids in roles.items()}
            w = wrk(path.url("/small.txt"), 64, seconds)
            for role, pids in roles.items():
                add(
                    results,
                    f"cpu_per_1k:{role}",
                    name,
                    (cpu_seconds(pids) - before[role]) / w.requests * 1000,
                )
            add(results, "small_rps", name, w.rps)
            add(results, "small_p50", name, w.p50)
            add(results, "small_p99", name, w.p99)
        elif figure == "16k":
            add(results, "16k_rps", name, wrk(path.url("/16k.bin"), 16, seconds).rps)
        elif figure == "c1":
            w = wrk(path.url("/small.txt"), 1, seconds)
            add(results, "c1_p50", name, w.p50)
            add(results, "c1_p99", name, w.p99)
        elif figure in ("download", "upload"):
            roles = path.cpu_roles()
            before = {role: cpu_seconds(pids) for role, pids in roles.items()}
            if figure == "download":
                speed = curl_download(path.url("/big.bin"), size)
            else:
                speed = curl_upload(
                    path.url("/upload"), s.tmp / "www" / "big.bin", size, s.tmp / "upload.log"
                )
            for role, pids in roles.items():
                add(
                    results,
                    f"cpu_per_gb_{figure}:{role}",
                    name,
                    (cpu_seconds(pids) - before[role]) / (size / 1e9),
                )
            add(results, f"{figure}_mbps", name, speed)
        elif figure == "fair":
            with BulkLoop(path.url("/big.bin"), s.procs) as bulk:
                w = wrk(path.url("/small.txt"), 1, seconds)
                if not bulk.running:
                    raise BenchError(f"{name}: the bulk download stopped during the fairness test")
            add(results, "fair_p99", name, w.p99)
            add(results, "fair_p50", name, w.p50)


# ---------------------------------------------------------------------------------------------------------
# scale: many concurrent long-polls through one agent


def scale_test(s: Setup, count: int) -> dict[str, float]:
    import trio  # only this test needs it; the rest of the script drives subprocesses
    from longpoll_upstream import hold_many

    upstream = s.procs.start(
        "longpoll", [sys.executable, str(BENCH / "longpoll_upstream.py"), "--max-hold", "300"]
    )
    upstream_port = int(s.procs.wait_line("longpoll", upstream, r"listening (\d+)").group(1))
    path, pids = start_rtunnel(s, upstream_port, "scale", streams=count)
    for _ in range(20):  # warm up: a few exchanges so the baseline includes the code paths' first allocations
        run(["curl", "-sf", "--max-time", "10", path.url("/stats")], timeout=20)
    base = {role: memory_kib(pid) for role, pid in pids.items()}
    report: dict[str, float] = {"count": count}

    def all_held() -> None:
        time.sleep(1)  # let buffers settle before reading RSS
        for role, pid in pids.items():
            now = memory_kib(pid)
            report[f"{role}_rss_base_kib"] = base[role]["VmRSS"]
            report[f"{role}_rss_held_kib"] = now["VmRSS"]
            report[f"{role}_kib_per_stream"] = (now["VmRSS"] - base[role]["VmRSS"]) / count

    outcome = trio.run(hold_many, path.port, upstream_port, count, all_held)
    report.update(outcome)
    report["failed"] = count - outcome["completed"]
    if report["failed"]:
        print(f"  scale: outcomes {outcome}", file=sys.stderr)
    for role, pid in pids.items():
        report[f"{role}_hwm_kib"] = memory_kib(pid)["VmHWM"]
    return report


def profile_rtunnel(s: Setup, outdir: Path, seconds: float) -> None:
    """Sample the relay and the agent with py-spy under each load in turn, and print where their time goes."""
    py_spy = find_py_spy()
    if py_spy is None:
        raise BenchError(
            "--profile needs py-spy (pip install py-spy; a profiling tool, not a project dependency)"
        )
    outdir.mkdir(parents=True, exist_ok=True)
    path = s.paths["rtunnel"]
    pids = {role: found[0] for role, found in path.cpu_roles().items()}
    for load in ("small", "download", "upload"):
        before, began = {role: cpu_seconds([pid]) for role, pid in pids.items()}, time.monotonic()
        spies = [
            s.procs.start(f"py-spy-{role}", record_args(py_spy, pid, seconds, outdir / f"{role}-{load}.raw"))
            for role, pid in pids.items()
        ]
        done = 0
        while any(spy.poll() is None for spy in spies):
            if load == "small":
                done += wrk(path.url("/small.txt"), 64, 2).requests
            elif load == "download":
                curl_download(path.url("/big.bin"), s.bulk_size)
                done += 1
            else:
                curl_upload(path.url("/upload"), s.tmp / "www" / "big.bin", s.bulk_size, s.tmp / "upload.log")
                done += 1
        elapsed = time.monotonic() - began
        usage = ", ".join(f"{r} {(cpu_seconds([p]) - before[r]) / elapsed:.0%}" for r, p in pids.items())
        print(
            f"\n== {load}: {done} {'requests' if load == 'small' else 'transfers'}; CPU of one core: {usage}"
        )
        for role in pids:
            print(summarize(outdir / f"{role}-{load}.raw"))
    print(f"\nraw stacks (collapsed, for flamegraph.pl or speedscope) in {outdir}")


# ---------------------------------------------------------------------------------------------------------


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # children (relay, agent, upstream) inherit it
    return want


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, short loads (~1 minute)")
    parser.add_argument(
        "--serve", action="store_true", help="start everything, print URLs/PIDs, wait for Ctrl-C"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    parser.add_argument("--seconds", type=float, help="length of each wrk run (default 5, --quick 2)")
    parser.add_argument("--bulk-mib", type=int, help="bulk file size in MiB (default 256, --quick 32)")
    parser.add_argument(
        "--scale", type=int, help="concurrent long-polls (default 10000, --quick 1000; 0: skip)"
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="instead of the benchmark: py-spy the relay and the agent"
    )
    parser.add_argument(
        "--rtunnel-src",
        type=Path,
        default=ROOT,
        help="run rtunnel from this source tree (default: this checkout)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    bulk = (args.bulk_mib or (32 if args.quick else 256)) << 20
    scale = args.scale if args.scale is not None else (1000 if args.quick else 10_000)

    try:
        tools = find_tools()
        import trio  # noqa: F401
    except ImportError:
        print("bench/run.py needs trio and h11: run it with the project's venv python", file=sys.stderr)
        return 2
    except BenchError as exc:
        print(f"bench/run.py: {exc}", file=sys.stderr)
        return 2
    if scale:
        limit = raise_fd_limit(scale + 1000)
        if limit < scale + 1000:
            print(f"RLIMIT_NOFILE hard limit {limit}: scale test reduced", file=sys.stderr)
            scale = max(0, limit - 1000)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="rtunnel-bench-"))
    procs = Processes(tmp)
    s = Setup(tmp, procs, tools, bulk, args.rtunnel_src.resolve())
    results: Results = {}
    scale_report: dict[str, float] = {}
    began = time.monotonic()
    load: dict[str, float] = {}
    status = 0
    try:
        print(machine_text(), file=sys.stderr)
        busy = system_busy()
        time.sleep(1)
        load["busy_before"] = system_busy() - busy
        if load["busy_before"] > 0.2:
            print(
                f"warning: the machine is not idle ({load['busy_before']:.0%} of a CPU busy)", file=sys.stderr
            )
        start_nginx(s)
        start_ssh(s)
        s.paths["rtunnel"], _ = start_rtunnel(s, s.nginx_port, "rtunnel")
        check_paths(s)
        if args.serve:
            for path in s.paths.values():
                print(f"{path.name:8} {path.url('/small.txt')}  pids {path.cpu_roles()}")
            print(f"files: /small.txt /16k.bin /big.bin ({bulk >> 20} MiB), POST /upload; logs in {tmp}")
            print("Ctrl-C to stop")
            while True:
                time.sleep(3600)
        for path in s.paths.values():  # warm-up: connections, caches, the agent's upstream pool
            wrk(path.url("/small.txt"), 64, 1)
        if args.profile:
            profile_rtunnel(s, args.profile, seconds * 3)
            return 0
        busy, own, measuring = system_busy(), own_busy(), time.monotonic()
        figures = ["small", "16k", "c1", "download", "upload", "fair"]
        for fig in figures:
            for r in range(rounds):
                print(f"[{time.monotonic() - began:5.0f} s] {fig}, round {r + 1}/{rounds}", file=sys.stderr)
                measure_round(s, results, fig, seconds)
        if scale:
            print(f"[{time.monotonic() - began:5.0f} s] scale: {scale:,} long-polls", file=sys.stderr)
            try:
                scale_report = scale_test(s, scale)
            except Exception as exc:
                # The figures measured so far are still worth printing.
                print(f"bench/run.py: scale test failed: {exc!r}", file=sys.stderr)
                status = 1
        load["seconds"] = time.monotonic() - measuring
        load["others"] = (system_busy() - busy) - (own_busy() - own)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(f"bench/run.py: {exc}", file=sys.stderr)
        if not results:
            return 1
        status = 1
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.monotonic() - began
    print()
    print(
        f"{rounds} interleaved round(s), medians; wrk runs of {seconds:g} s; bulk {bulk >> 20} MiB; {elapsed:.0f} s in all"
    )
    print(machine_text())
    if "others" in load:
        print(
            f"other processes on the machine used {max(0.0, load['others']):.0f} CPU-seconds during the "
            f"{load['seconds']:.0f} s of measurement ({max(0.0, load['others']) / load['seconds']:.0%} of one "
            f"CPU; {load['busy_before']:.0%} busy just before the run)"
        )
    print()
    print(table(results))
    print()
    print(scale_text(scale_report))
    print()
    print(targets_text(results, scale_report))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "scale": scale_report, "load": load}, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
