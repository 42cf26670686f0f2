"""The two WebSocket transports side by side: trio-websocket (wsproto) and the websockets sans-IO core.

Usage:
  python bench/transport_bench.py micro  [--rounds N] [--scale F]
  python bench/transport_bench.py tunnel [--rounds N] [--download BYTES] [--upload BYTES]
  python bench/transport_bench.py run-rtunnel IMPL RTUNNEL-ARGS...   (used by `tunnel`)

micro: one trio process, both ends of one transport on loopback (127.0.0.1), the receiving end only
counts. Messages/s for 200-byte messages, MB/s for 64 KiB and 256 KiB messages, each in both
directions: c2s (client to server: masked; the agent is the client, so response bodies go this way)
and s2c. CPU is that of the one process (both ends).

tunnel: real processes: tests/e2e/upstream.py, `rtunnel serve` and `rtunnel dial` (run through
`run-rtunnel`, which makes `rtunnel.transport` the chosen implementation before the CLI loads), then
curl downloads GET /bytes/N and uploads N bytes to PUT /sha256 through the relay. Reports curl's
MB/s and the CPU seconds of the relay and of the agent (utime + stime from /proc) per transfer.

Rounds alternate the implementations (A B A B ...); the tables show medians.
IMPL: "wsproto" = bench/legacy_transport_trio_websocket.py (the adapter rtunnel used before), or
"websockets" = rtunnel.transport (the sans-IO websockets core).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMPLS = ("wsproto", "websockets")
TOKEN = "bench-token"
MiB = 1024 * 1024


def load_impl(name: str) -> ModuleType:
    """The transport module for `name`, importable as rtunnel.transport's stand-in."""
    if name == "websockets":
        return importlib.import_module("rtunnel.transport")
    if name == "wsproto":
        spec = importlib.util.spec_from_file_location(
            "rtunnel._legacy_transport", ROOT / "bench" / "legacy_transport_trio_websocket.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    raise SystemExit(f"unknown implementation {name!r} (choose from {', '.join(IMPLS)})")


# --------------------------------------------------------------------------------------------
# micro


async def _one_case(tr: Any, direction: str, size: int, count: int) -> tuple[float, float]:
    """(seconds, CPU seconds) to move `count` messages of `size` bytes, after a short warm-up."""
    payload = os.urandom(size)
    warmup = max(10, count // 20)
    result: list[float] = []
    finished = trio.Event()

    async def source(t: Any) -> None:
        for _ in range(warmup + count):
            await t.send(payload)

    async def sink(t: Any) -> None:
        for _ in range(warmup):
            await t.receive()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            await t.receive()
        result.extend((time.perf_counter() - start, time.process_time() - cpu))
        finished.set()

    async def server_side(t: Any) -> None:
        await (sink(t) if direction == "c2s" else source(t))
        await finished.wait()

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            partial(tr.serve, server_side, "127.0.0.1", 0, authenticate=lambda token: token == TOKEN.encode())
        )
        async with tr.connect(f"ws://{host}:{port}/", token=TOKEN, ssl_context=None) as t:
            if direction == "c2s":
                await source(t)
            else:
                await sink(t)
            await finished.wait()
        nursery.cancel_scope.cancel()
    return result[0], result[1]


MICRO_CASES = [(200, 40_000), (64 * 1024, 3_000), (256 * 1024, 800)]


def micro(rounds: int, scale: float) -> None:
    modules = {name: load_impl(name) for name in IMPLS}
    samples: dict[tuple[str, str, int], list[tuple[float, float, int]]] = {}
    for round_no in range(rounds):
        for size, base_count in MICRO_CASES:
            count = max(100, int(base_count * scale))
            for direction in ("c2s", "s2c"):
                for name in IMPLS:
                    seconds, cpu = trio.run(_one_case, modules[name], direction, size, count)
                    samples.setdefault((name, direction, size), []).append((seconds, cpu, count))
        print(f"round {round_no + 1}/{rounds} done", file=sys.stderr)
    print("\nmicro: one process, loopback; median of", rounds, "rounds")
    print(f"{'case':<16} {'wsproto':>20} {'websockets':>20} {'ratio':>7}")
    for size, _ in MICRO_CASES:
        for direction in ("c2s", "s2c"):
            cells: list[str] = []
            rates: list[float] = []
            for name in IMPLS:
                runs = samples[(name, direction, size)]
                if size < 4096:
                    rate = statistics.median(count / s for s, _, count in runs)
                    cell = f"{rate:,.0f} msg/s"
                else:
                    rate = statistics.median(count * size / s / 1e6 for s, _, count in runs)
                    cpu_per_gb = statistics.median(cpu / (count * size / 1e9) for _, cpu, count in runs)
                    cell = f"{rate:,.0f} MB/s {cpu_per_gb:.1f}s/GB"
                rates.append(rate)
                cells.append(cell)
            label = f"{size // 1024} KiB" if size >= 1024 else f"{size} B"
            print(f"{label + ' ' + direction:<16} {cells[0]:>20} {cells[1]:>20} {rates[1] / rates[0]:>6.1f}x")


# --------------------------------------------------------------------------------------------
# tunnel


def run_rtunnel(impl: str, args: list[str]) -> int:
    """Run the rtunnel CLI with `impl` standing in for rtunnel.transport."""
    module = load_impl(impl)
    import rtunnel

    sys.modules["rtunnel.transport"] = module
    rtunnel.transport = module  # type: ignore[attr-defined]
    from rtunnel.cli import main

    return main(args)


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Proc:
    def __init__(self, name: str, cmd: list[str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self.out = logdir / f"{name}.out"
        with self.log.open("wb") as err, self.out.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)

    def wait_for(self, pattern: str, *, stream: str = "log", timeout: float = 30) -> re.Match[str]:
        path = self.log if stream == "log" else self.out
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, path.read_text(errors="replace"))
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"{self.name}: no {pattern!r}; log:\n{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def _tunnel(impl: str, upstream_port: int, logdir: Path) -> Iterator[tuple[str, _Proc, _Proc]]:
    me = [sys.executable, str(Path(__file__).resolve()), "run-rtunnel", impl]
    relay = _Proc(f"relay-{impl}", [*me, "serve", "--http", "127.0.0.1:0", "--agents", "127.0.0.1:0"], logdir)
    agent: _Proc | None = None
    try:
        found = relay.wait_for(r"listening http=(\S+):(\d+) agents=(\S+):(\d+)")
        http_url = f"http://127.0.0.1:{found.group(2)}"
        agents_url = f"ws://127.0.0.1:{found.group(4)}"
        agent = _Proc(
            f"agent-{impl}",
            [*me, "dial", agents_url, "--upstream", f"http://127.0.0.1:{upstream_port}"],
            logdir,
        )
        agent.wait_for("connected to")
        yield http_url, relay, agent
    finally:
        if agent is not None:
            agent.stop()
        relay.stop()


def _curl(args: list[str]) -> float:
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", *args], capture_output=True, text=True, check=True
    )
    return float(out.stdout) / 1e6


def _measured(relay: _Proc, agent: _Proc, curl_args: list[str]) -> tuple[float, float, float]:
    before = (_cpu(relay.proc.pid), _cpu(agent.proc.pid))
    mbps = _curl(curl_args)
    return mbps, _cpu(relay.proc.pid) - before[0], _cpu(agent.proc.pid) - before[1]


def tunnel(rounds: int, download: int, upload: int) -> None:
    env_token = {"RTUNNEL_TOKEN": TOKEN}
    os.environ.update(env_token)
    samples: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="transport-bench-") as tmp:
        logdir = Path(tmp)
        body = logdir / "upload.bin"
        with body.open("wb") as f:
            for _ in range(upload // MiB):
                f.write(os.urandom(MiB))
            f.write(os.urandom(upload % MiB))
        upstream = _Proc("upstream", [sys.executable, "tests/e2e/upstream.py", "--port", "0"], logdir)
        try:
            port = int(upstream.wait_for(r"READY (\d+)", stream="out").group(1))
            for round_no in range(rounds):
                for impl in IMPLS:
                    with _tunnel(impl, port, logdir) as (url, relay, agent):
                        down = ["-w", "%{speed_download}", f"{url}/bytes/{download}"]
                        up = ["-w", "%{speed_upload}", "-T", str(body), f"{url}/sha256"]
                        samples.setdefault((impl, "download"), []).append(_measured(relay, agent, down))
                        samples.setdefault((impl, "upload"), []).append(_measured(relay, agent, up))
                print(f"round {round_no + 1}/{rounds} done", file=sys.stderr)
        finally:
            upstream.stop()
    print(
        f"\ntunnel: curl through relay + agent, download {download / 1e6:g} MB, upload {upload / 1e6:g} MB;"
    )
    print(f"median of {rounds} rounds; CPU = seconds of each process for the whole transfer")
    print("CPU ceiling = MB / the busier process's CPU seconds (what one core per end could carry)")
    print(
        f"{'transfer':<10} {'impl':<11} {'MB/s':>7} {'relay CPU s':>12} {'agent CPU s':>12} {'ceiling MB/s':>13}"
    )
    for what, size in (("download", download), ("upload", upload)):
        for impl in IMPLS:
            runs = samples[(impl, what)]
            mbps = statistics.median(r[0] for r in runs)
            relay_cpu = statistics.median(r[1] for r in runs)
            agent_cpu = statistics.median(r[2] for r in runs)
            ceiling = size / 1e6 / max(relay_cpu, agent_cpu, 0.01)
            print(
                f"{what:<10} {impl:<11} {mbps:>7.0f} {relay_cpu:>12.2f} {agent_cpu:>12.2f} {ceiling:>13.0f}"
            )


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "run-rtunnel":
        return run_rtunnel(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    p_micro = sub.add_parser("micro")
    p_micro.add_argument("--rounds", type=int, default=3)
    p_micro.add_argument("--scale", type=float, default=1.0, help="multiply the message counts")
    p_tunnel = sub.add_parser("tunnel")
    p_tunnel.add_argument("--rounds", type=int, default=2)
    p_tunnel.add_argument("--download", type=int, default=400_000_000)
    p_tunnel.add_argument("--upload", type=int, default=200_000_000)
    args = parser.parse_args()
    if args.mode == "micro":
        micro(args.rounds, args.scale)
    else:
        tunnel(args.rounds, args.download, args.upload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
