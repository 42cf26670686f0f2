"""What the dashboard and the inspector cost the exchange path: one relay + agent per configuration, in front of
the same nginx, measured with wrk in interleaved rounds (A B C A B C ...), medians reported.

    python bench/inspect_bench.py                 # 3 rounds of 5 s per configuration
    python bench/inspect_bench.py --rounds 5 --seconds 10

Configurations: "plain" (no --admin), "dashboard" (--admin on both ends, a dashboard page's event stream open
on each), "inspect" (the same plus --inspect 1000: every exchange captured, heads and bodies redacted).
Loads: GET of a 1 KiB file (the per-exchange cost dominates) and POST of a 16 KiB JSON body (the capture copies
and redacts it). Needs nginx, wrk and curl; everything listens on 127.0.0.1 in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "plain": [],
    "dashboard": ["--admin", "127.0.0.1:0"],
    "inspect": ["--admin", "127.0.0.1:0", "--inspect", "1000"],
}
NGINX_CONF = """daemon off; worker_processes 1; pid {dir}/nginx.pid; error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{ access_log off; keepalive_requests 10000000; client_body_temp_path {dir}/body;
  server {{ listen 127.0.0.1:{port}; root {dir}/www;
    location = /post {{ client_max_body_size 1m; return 200 "ok\n"; }}
  }}
}}
"""
POST_LUA = """wrk.method = "POST"
wrk.body = '{{"user": "u", "password": "p", "data": "{data}"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer abc"
"""
LINE = re.compile(r"(listening http=\S+:(\d+) agents=\S+:(\d+))|(admin listening on http://(\S+?):(\d+))")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, args: list[str], **kwargs: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen(args, text=True, start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def wait_lines(proc: subprocess.Popen[str], count: int) -> list[re.Match[str]]:
    found: list[re.Match[str]] = []
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while len(found) < count and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"process exited: {proc.args}")
        if match := LINE.search(line):
            found.append(match)
    return found


def start_tunnel(procs: Procs, extra: list[str], upstream: int) -> tuple[list[subprocess.Popen[str]], int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RTUNNEL_TOKEN=secrets.token_urlsafe(24))
    cmd = [sys.executable, "-m", "rtunnel", "--log-level", "warning"]
    serve = ["serve", "--http", "127.0.0.1:0", "--agents", "127.0.0.1:0", "--max-connections-per-ip", "0"]
    serve += ["--max-exchanges-per-ip", "0"]
    # warning level hides the listening lines: ask for them at info, then the access log stays quiet anyway.
    cmd_info = [sys.executable, "-m", "rtunnel"]
    relay = procs.start([*cmd_info, *serve, *extra], env=env, stderr=subprocess.PIPE)
    lines = wait_lines(relay, 2 if extra else 1)
    http_port = next(int(m.group(2)) for m in lines if m.group(1))
    agents_port = next(int(m.group(3)) for m in lines if m.group(1))
    admin_ports = [int(m.group(6)) for m in lines if m.group(4)]
    dial = ["dial", f"ws://127.0.0.1:{agents_port}", "--upstream", f"http://127.0.0.1:{upstream}", *extra]
    agent = procs.start([*cmd, *dial], env=env, stderr=subprocess.DEVNULL)
    started = [relay, agent]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            out = subprocess.run(
                ["curl", "-sf", "--max-time", "2", f"http://127.0.0.1:{http_port}/small.txt"],
                capture_output=True,
                check=False,
            )
        except OSError:
            out = None
        if out is not None and out.returncode == 0:
            break
        time.sleep(0.2)
    # A page left open on the relay's dashboard: its event stream is part of what is measured.
    for port in admin_ports:
        started.append(
            procs.start(["curl", "-sN", f"http://127.0.0.1:{port}/events"], stdout=subprocess.DEVNULL)
        )
    # The relay's access log goes to a pipe nobody reads: drain it in the background via cat.
    assert relay.stderr is not None
    started.append(procs.start(["cat"], stdin=relay.stderr, stdout=subprocess.DEVNULL))
    return started, http_port


def wrk(port: int, seconds: float, script: Path | None, path: str) -> tuple[float, float]:
    args = ["wrk", "-t", "2", "-c", "16", "-d", f"{round(seconds)}s", "--latency"]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run(
        [*args, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    assert p50 is not None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p50.group(2)]
    return rps, float(p50.group(1)) * scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "curl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"needs {tool}", file=sys.stderr)
            return 2
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="rtunnel-inspect-bench-"))
    try:
        (tmp / "www").mkdir()
        (tmp / "www" / "small.txt").write_bytes(b"x" * 1024)
        tmp.chmod(0o755)
        port = free_port()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(dir=tmp, port=port))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        procs.start([nginx, "-c", str(tmp / "nginx.conf")], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        post = tmp / "post.lua"
        post.write_text(POST_LUA.format(data="d" * (16 * 1024)))
        tunnels = {name: start_tunnel(procs, extra, port) for name, extra in CONFIGS.items()}
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for load, script, path in (
                ("GET 1 KiB", None, "/small.txt"),
                ("POST 16 KiB JSON", post, "/post"),
            ):
                for name, (_, http_port) in tunnels.items():
                    results.setdefault((load, name), []).append(wrk(http_port, args.seconds, script, path))
        print(f"{args.rounds} interleaved rounds of {args.seconds:g} s, wrk -t2 -c16, medians")
        print(f"{'load':<18} {'config':<10} {'req/s':>9} {'p50 ms':>8} {'vs plain':>9}")
        for (load, name), samples in results.items():
            rps = statistics.median(s[0] for s in samples)
            p50 = statistics.median(s[1] for s in samples)
            base = statistics.median(s[0] for s in results[(load, "plain")])
            print(f"{load:<18} {name:<10} {rps:>9.0f} {p50:>8.2f} {rps / base - 1:>+9.1%}")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
