"""`python bench/run.py --apps`: one Starlette app (bench/app_small.py, 100 bytes) behind `dial --app` and
behind `dial --upstream` with uvicorn serving it, `wrk -c64`, in interleaved rounds.

Reported per route: requests/s, and CPU per request (microseconds) of the relay, the agent, the app's server
(uvicorn; none for --app, where the agent is the server) and of all of them together: the in-process path
replaces the agent's HTTP client, uvicorn's HTTP server and a localhost connection per exchange. Both routes
run with the same relay options and `--log-level warning` (no access-log lines), so only the service side
differs. Needs wrk and uvicorn (`pip install -e '.[test,bench]'`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from loads import wrk
from procs import BenchError, Processes, cpu_seconds, free_port, wait_port

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LISTENING = r"listening http=127\.0\.0\.1:(\d+) agents=127\.0\.0\.1:(\d+)"


def _route(procs: Processes, key: str, service: list[str]) -> tuple[str, dict[str, list[int]]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RTUNNEL_TOKEN=secrets.token_urlsafe(24))
    rtunnel = [sys.executable, "-m", "rtunnel", "--log-level", "warning"]
    serve = ["serve", "--http", "127.0.0.1:0", "--agents", "127.0.0.1:0"]
    for option in ("--max-connections", "--max-connections-per-ip", "--max-exchanges-per-ip"):
        serve += [option, "0"]  # all the load comes from one address
    # The relay logs its listening line at info: let it, then it is quiet under load as the agent is.
    relay = procs.start(f"{key}-relay", [sys.executable, "-m", "rtunnel", *serve], env=env, cwd=ROOT)
    match = procs.wait_line(f"{key}-relay", relay, LISTENING)
    http_port, agents_port = match.group(1), match.group(2)
    agent = procs.start(
        f"{key}-agent", [*rtunnel, "dial", f"ws://127.0.0.1:{agents_port}", *service], env=env, cwd=ROOT
    )
    url = f"http://127.0.0.1:{http_port}/small"
    for _ in range(100):  # until the agent is connected and the app answers
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                break
        if agent.poll() is not None:
            raise BenchError(f"{key} agent exited:\n{procs.log_text(f'{key}-agent')[-2000:]}")
        time.sleep(0.1)
    else:
        raise BenchError(f"{key}: no answer through the tunnel")
    return url, {"relay": [relay.pid], "agent": [agent.pid]}


def run_apps(rounds: int, seconds: float) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="rtunnel-bench-apps-"))
    procs = Processes(tmp)
    try:
        port = free_port()
        uvicorn = procs.start(
            "uvicorn",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app_small:app",
                "--app-dir",
                str(BENCH),
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        wait_port(port, uvicorn, "uvicorn")
        routes = {
            "--app": _route(procs, "app", ["--app", "app_small:app", "--app-dir", str(BENCH)]),
            "--upstream uvicorn": _route(procs, "upstream", ["--upstream", f"http://127.0.0.1:{port}"]),
        }
        routes["--upstream uvicorn"][1]["server"] = [uvicorn.pid]
        results: dict[str, dict[str, list[float]]] = {name: {} for name in routes}
        for _ in range(rounds):
            for name, (url, roles) in routes.items():
                before = {role: cpu_seconds(pids) for role, pids in roles.items()}
                load = wrk(url, 64, seconds)
                got = results[name]
                got.setdefault("rps", []).append(load.rps)
                total = 0.0
                for role, pids in roles.items():
                    used = (cpu_seconds(pids) - before[role]) / load.requests * 1e6
                    got.setdefault(role, []).append(used)
                    total += used
                got.setdefault("total", []).append(total)
        print(f"Starlette, 100-byte GET, wrk -c64, {rounds} rounds of {seconds:g} s (medians)")
        print("CPU per request in microseconds")
        print(
            f"{'route':<20} {'req/s':>8} {'relay':>7} {'agent':>7} {'uvicorn':>8} {'agent+uvicorn':>14} {'total':>7}"
        )
        for name, got in results.items():
            med = {key: statistics.median(values) for key, values in got.items()}
            server = med.get("server", 0.0)
            shown = f"{server:.0f}" if server else "-"
            print(
                f"{name:<20} {med['rps']:>8.0f} {med['relay']:>7.0f} {med['agent']:>7.0f} "
                f"{shown:>8} {med['agent'] + server:>14.0f} {med['total']:>7.0f}"
            )
        return 0
    except BenchError as exc:
        print(f"bench/run.py --apps: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    match = re.fullmatch(r"(\d+)x([\d.]+)", sys.argv[1]) if len(sys.argv) > 1 else None
    sys.exit(run_apps(int(match.group(1)), float(match.group(2))) if match else run_apps(3, 5.0))
