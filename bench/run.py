"""Side-by-side benchmark: nginx direct, through `ssh -R`, through pproxy (backward mode) and through rtunnel (ws://
and wss://), in one run.

    python bench/run.py                 # full run (~9 minutes): 3 interleaved rounds, 256 MiB bulk, 10,000 long-polls
    python bench/run.py --quick         # smoke run (1-2 minutes): 1 round, short loads, 32 MiB bulk, 1,000 long-polls
    python bench/run.py --compare main  # and a column for another revision (or checkout directory) of rtunnel
    python bench/run.py --serve         # start everything, print URLs and PIDs, wait for Ctrl-C (for profiling)
    python bench/run.py --profile DIR   # py-spy the relay and the agent under each load (needs py-spy)
    python bench/run.py --apps          # a Starlette app behind `dial --app` vs uvicorn behind --upstream

Needs the Debian packages nginx, openssh-server, openssh-client, wrk, curl and openssl (the script says how to
install them if one is missing), a Python with this repository's dependencies, and the first time, PyPI, from
which it installs pproxy into a venv of its own. Everything listens on 127.0.0.1 only, in a temporary directory
that is removed at the end, and every process the script started is stopped (each runs in its own process group)
however the run ends.

The routes are described in bench/tunnels.py. Each figure is measured in rounds interleaved across the routes
(A B C D A B C D ...), the table shows the medians, and each rtunnel route also as a ratio to pproxy and to
ssh -R, then the targets of issue 11. Tunnel CPU (utime + stime from /proc) is both ends': relay + agent,
the public and backward ends of pproxy, sshd + ssh. The scale test (long-polls) runs on its own relay + agent in
front of bench/longpoll_upstream.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from loads import BulkLoop, curl_download, curl_upload, wrk
from procs import BenchError, Processes, cpu_seconds, memory_kib, own_busy, run, system_busy
from pyspy import find_py_spy, record_args, summarize
from report import MAIN, Results, machine_text, scale_text, table, targets_text
from tunnels import (
    BENCH,
    ROOT,
    ROUTE_KEYS,
    Build,
    Route,
    Setup,
    check_routes,
    find_tools,
    resolve_build,
    start_routes,
    start_rtunnel,
)

FIGURES = ("small", "c1", "16k", "download", "upload", "fair")


def add(results: Results, key: str, route: str, value: float) -> None:
    results.setdefault(key, {}).setdefault(route, []).append(value)


class CpuMeter:
    """CPU seconds each end of a route spent between construction and `per()`."""

    def __init__(self, route: Route) -> None:
        self.roles = route.cpu_roles()
        self.before = {role: cpu_seconds(pids) for role, pids in self.roles.items()}

    def add_per(self, results: Results, key: str, route: str, units: float, scale: float) -> None:
        for role, pids in self.roles.items():
            add(results, f"{key}:{role}", route, (cpu_seconds(pids) - self.before[role]) / units * scale)


def measure(s: Setup, route: Route, results: Results, fig: str, seconds: float) -> None:
    """One round of one figure on one route."""
    name, size = route.name, s.bulk_size
    cpu = CpuMeter(route)
    if fig == "small":
        w = wrk(route.url("/small.txt"), 64, seconds)
        cpu.add_per(results, "cpu_small", name, w.requests, 1e6)
        add(results, "small_rps", name, w.rps)
        add(results, "small_p99", name, w.p99)
    elif fig == "c1":
        w = wrk(route.url("/small.txt"), 1, seconds)
        cpu.add_per(results, "cpu_c1", name, w.requests, 1e6)
        add(results, "c1_p50", name, w.p50)
        add(results, "c1_p99", name, w.p99)
    elif fig == "16k":
        w = wrk(route.url("/16k.bin"), 16, seconds)
        cpu.add_per(results, "cpu_16k", name, w.requests, 1e6)
        add(results, "16k_rps", name, w.rps)
    elif fig == "download":
        add(results, "download_mbps", name, curl_download(route.url("/big.bin"), size))
        cpu.add_per(results, "cpu_gb_download", name, size / 1e9, 1)
    elif fig == "upload":
        speed = curl_upload(route.url("/upload"), s.tmp / "www" / "big.bin", size, s.tmp / "upload.log")
        add(results, "upload_mbps", name, speed)
        cpu.add_per(results, "cpu_gb_upload", name, size / 1e9, 1)
    elif fig == "fair":
        with BulkLoop(route.url("/big.bin"), s.procs) as bulk:
            w = wrk(route.url("/small.txt"), 1, seconds)
            if not bulk.running:
                raise BenchError(f"{name}: the bulk download stopped during the fairness test")
        add(results, "fair_p99", name, w.p99)


# ---------------------------------------------------------------------------------------------------------
# scale: many concurrent long-polls through one agent


def scale_test(s: Setup, build: Build, count: int) -> dict[str, float]:
    import trio  # only this test needs it; the rest of the script drives subprocesses
    from longpoll_upstream import hold_many

    upstream = s.procs.start(
        "longpoll", [sys.executable, str(BENCH / "longpoll_upstream.py"), "--max-hold", "300"]
    )
    upstream_port = int(s.procs.wait_line("longpoll", upstream, r"listening (\d+)").group(1))
    started = start_rtunnel(s, build, upstream_port, "scale", streams=count)
    assert started is not None
    route, pids = started
    for _ in range(20):  # warm up: a few exchanges so the baseline includes the code paths' first allocations
        run(["curl", "-sf", "--max-time", "10", route.url("/stats")], timeout=20)
    base = {role: memory_kib(pid) for role, pid in pids.items()}
    report: dict[str, float] = {"count": count}

    def all_held() -> None:
        time.sleep(1)  # let buffers settle before reading RSS
        for role, pid in pids.items():
            now = memory_kib(pid)
            report[f"{role}_rss_base_kib"] = base[role]["VmRSS"]
            report[f"{role}_rss_held_kib"] = now["VmRSS"]
            report[f"{role}_kib_per_stream"] = (now["VmRSS"] - base[role]["VmRSS"]) / count

    outcome = trio.run(hold_many, route.port, upstream_port, count, all_held)
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
    route = s.routes[MAIN]
    pids = {role: found[0] for role, found in route.cpu_roles().items()}
    for load in ("small", "download", "upload"):
        before, began = {role: cpu_seconds([pid]) for role, pid in pids.items()}, time.monotonic()
        spies = [
            s.procs.start(f"py-spy-{role}", record_args(py_spy, pid, seconds, outdir / f"{role}-{load}.raw"))
            for role, pid in pids.items()
        ]
        done = 0
        while any(spy.poll() is None for spy in spies):
            if load == "small":
                done += wrk(route.url("/small.txt"), 64, 2).requests
            elif load == "download":
                curl_download(route.url("/big.bin"), s.bulk_size)
                done += 1
            else:
                curl_upload(
                    route.url("/upload"), s.tmp / "www" / "big.bin", s.bulk_size, s.tmp / "upload.log"
                )
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="smoke run: 1 round, short loads (1-2 minutes)")
    add("--serve", action="store_true", help="start everything, print URLs/PIDs, wait for Ctrl-C")
    add("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    add("--seconds", type=float, help="length of each wrk run (default 5, --quick 2)")
    add("--bulk-mib", type=int, help="bulk file size in MiB (default 256, --quick 32)")
    add("--scale", type=int, help="concurrent long-polls (default 10000, --quick 1000; 0: skip)")
    add("--figures", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    add(
        "--only",
        default=",".join(ROUTE_KEYS),
        help=f"comma-separated subset of the routes {','.join(ROUTE_KEYS)}",
    )
    add("--compare", action="append", default=[], metavar="REV_OR_DIR", help="also measure rtunnel from this git revision, or from this checkout directory (with its .venv if it has one); repeatable")  # fmt: skip
    add("--json", type=Path, help="also write the raw results here")
    add("--apps", action="store_true", help="instead: a Starlette app behind --app vs --upstream uvicorn")
    add(
        "--profile", type=Path, metavar="DIR", help="instead of the benchmark: py-spy the relay and the agent"
    )
    add(
        "--rtunnel-src",
        type=Path,
        default=ROOT,
        help="run rtunnel from this source tree (default: this checkout)",
    )
    args = parser.parse_args()
    if args.profile and "ws" not in args.only.split(","):
        parser.error("--profile samples the ws:// route: keep ws in --only")
    for option, known in (("figures", FIGURES), ("only", ROUTE_KEYS)):
        chosen = {x.strip() for x in getattr(args, option).split(",") if x.strip()}
        if chosen - set(known):
            parser.error(f"--{option}: unknown {', '.join(sorted(chosen - set(known)))}")
        setattr(args, option, chosen)
    return args


def main() -> int:
    args = parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    if args.apps:
        from apps import run_apps

        return run_apps(rounds, seconds)
    bulk = (args.bulk_mib or (32 if args.quick else 256)) << 20
    scale = args.scale if args.scale is not None else (1000 if args.quick else 10_000)
    if "ws" not in args.only or args.serve or args.profile:
        scale = 0

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
    s = Setup(tmp, procs, tools, bulk)
    build = Build(MAIN, args.rtunnel_src.resolve(), sys.executable)
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
        compare = [resolve_build(spec, tmp) for spec in args.compare]
        start_routes(s, build, compare, args.only)
        check_routes(s)
        if args.serve:
            for route in s.routes.values():
                print(f"{route.name:16} {route.url('/small.txt')}  pids {route.cpu_roles()}")
            print(f"files: /small.txt /16k.bin /big.bin ({bulk >> 20} MiB), POST /upload; logs in {tmp}")
            print("Ctrl-C to stop")
            while True:
                time.sleep(3600)
        for route in s.routes.values():  # warm-up: connections, caches, the agent's upstream pool
            wrk(route.url("/small.txt"), 64, 1)
        if args.profile:
            profile_rtunnel(s, args.profile, seconds * 3)
            return 0
        busy, own, measuring = system_busy(), own_busy(), time.monotonic()
        for fig in (f for f in FIGURES if f in args.figures):
            for r in range(rounds):
                print(f"[{time.monotonic() - began:5.0f} s] {fig}, round {r + 1}/{rounds}", file=sys.stderr)
                for route in s.routes.values():
                    if route.takes(fig):
                        measure(s, route, results, fig, seconds)
        if scale:
            print(f"[{time.monotonic() - began:5.0f} s] scale: {scale:,} long-polls", file=sys.stderr)
            try:
                scale_report = scale_test(s, build, scale)
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

    print_report(s, results, scale_report, load, f"{rounds} interleaved round(s), medians; wrk runs of {seconds:g} s; bulk {bulk >> 20} MiB; {time.monotonic() - began:.0f} s in all")  # fmt: skip
    if args.json:
        routes = list(s.routes)
        args.json.write_text(json.dumps({"routes": routes, "notes": s.notes, "results": results, "scale": scale_report, "load": load}, indent=1))  # fmt: skip
    return status


def print_report(
    s: Setup, results: Results, scale_report: dict[str, float], load: dict[str, float], how: str
) -> None:
    print()
    print(f"command: {' '.join(['bench/run.py', *sys.argv[1:]])}")
    print(how)
    print(machine_text())
    if "others" in load:
        others = max(0.0, load["others"])
        print(
            f"other processes on the machine used {others:.0f} CPU-seconds during the {load['seconds']:.0f} s of "
            f"measurement ({others / load['seconds']:.0%} of one CPU; {load['busy_before']:.0%} busy just before "
            "the run)"
        )
    for note in s.notes:
        print(note)
    print()
    print(table(results, list(s.routes)))
    print()
    print(scale_text(scale_report))
    print()
    print(targets_text(results, list(s.routes), scale_report))


if __name__ == "__main__":
    sys.exit(main())
