"""Soak: a relay and two agents under mixed traffic for minutes, with the agents' links cut every ~30 s.

    python bench/soak.py                 # 10 minutes
    python bench/soak.py --duration 120  # a shorter run

The stack is tests/e2e/traffic.py's (real `rtunnel` processes, real upstreams, tests/faultproxy.py between
the agents and the relay): small requests, bulk downloads and uploads, SSE streams, WebSocket sessions, uploads
and downloads the client abandons, requests the allowlist denies. Every response is checked by status and
SHA-256 of its body. Every few seconds the relay's and both agents' admin endpoints are sampled (/status.json:
RSS, file descriptors, trio tasks, open streams).

Verdict (exit 0 only when it holds): no wrong response; no failed exchange that a link cut does not explain;
after traffic stops, every process is back at its starting streams (0), tasks and fds (idle pooled upstream
connections aside); RSS grew less than 10% from the end of the warm-up minute to the end.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import secrets
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.traffic import KINDS, Checker, Snapshot, Stack, open_stack, run_kind

# How often each kind is picked by a worker: mostly small requests, as in real traffic.
WEIGHTS = {
    "small": 40,
    "bulk down": 4,
    "bulk up": 4,
    "sse": 6,
    "websocket": 6,
    "aborted upload": 3,
    "aborted download": 3,
    "denied": 4,
}
RSS_GROWTH_LIMIT = 0.10
SETTLE = 60.0  # after traffic stops, how long the ends get to return to their starting levels


def levels(snapshot: Snapshot) -> dict[str, tuple[int, int, int]]:
    return {
        name: (p["streams_open"], p["tasks"], p["fds"] - p["pooled_connections"])
        for name, p in snapshot.processes.items()
    }


async def worker(stack: Stack, checker: Checker, rng: random.Random) -> None:
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    while True:
        await run_kind(stack, checker, rng.choices(kinds, weights)[0])


async def cutter(stack: Stack, checker: Checker, interval: float, rng: random.Random) -> None:
    while True:
        await trio.sleep(interval * rng.uniform(0.8, 1.2))
        checker.cuts.append(trio.current_time())
        stack.proxy.cut()


async def sampler(
    stack: Stack, samples: list[tuple[float, Snapshot]], interval: float, started: float
) -> None:
    while True:
        samples.append((trio.current_time() - started, await stack.snapshot()))
        await trio.sleep(interval)


def table(samples: list[tuple[float, Snapshot]], every: float) -> str:
    names = list(samples[0][1].processes)
    header = ["t (s)"] + [
        f"{n} {k}" for n in names for k in ("RSS MiB", "kblocks", "fds", "tasks", "streams")
    ]
    rows, last = [header], -every
    for i, (t, snapshot) in enumerate(samples):
        if t - last < every and i != len(samples) - 1:
            continue
        last = t
        row = [f"{t:.0f}"]
        for name in names:
            p = snapshot.processes[name]
            row += [f"{p['rss_bytes'] / 2**20:.1f}", f"{p['allocated_blocks'] / 1000:.0f}"]
            row += [str(p["fds"]), str(p["tasks"]), str(p["streams_open"])]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    token = "soak-" + secrets.token_urlsafe(16)
    # The in-process upstream logs every upload a client abandons, with a traceback: expected here.
    logging.getLogger("upstream").disabled = True
    # The processes' own logs (every access line) go to a file, printed there when they stop.
    with open(args.log, "w") as log, contextlib.redirect_stdout(log):
        checker, samples, start, end = trio.run(_run, args, rng, token)
    print(table(samples, args.table_every))
    print()
    print(f"process logs: {args.log}")
    return verdict(args, checker, samples, start, end)


async def _run(
    args: argparse.Namespace, rng: random.Random, token: str
) -> tuple[
    Checker, list[tuple[float, Snapshot]], dict[str, tuple[int, int, int]], dict[str, tuple[int, int, int]]
]:
    async with open_stack(token) as stack:
        checker = Checker()
        # Warm-up: pools and caches exist from here on, and the heaviest moment the workers can make (every
        # one of them in a bulk transfer at once) has set the allocator's high-water mark.
        async with trio.open_nursery() as nursery:
            for _ in range(args.concurrency):
                for kind in ("bulk down", "bulk up", "aborted download", "websocket", "small"):
                    nursery.start_soon(run_kind, stack, checker, kind)
        await stack.http.aclose()
        stack.http = type(stack.http)(base_url=stack.http.base_url, timeout=60, trust_env=False)
        start = levels(await stack.snapshot())
        samples: list[tuple[float, Snapshot]] = []
        started = trio.current_time()
        async with stack.http, trio.open_nursery() as nursery:
            nursery.start_soon(sampler, stack, samples, args.sample_interval, started)
            nursery.start_soon(cutter, stack, checker, args.cut_interval, rng)
            for _ in range(args.concurrency):
                nursery.start_soon(worker, stack, checker, rng)
            await trio.sleep(args.duration)
            nursery.cancel_scope.cancel()  # the exchanges in flight are abandoned mid-way, too
        # Traffic has stopped: wait for every end to return to where it started.
        end = levels(await stack.snapshot())
        with trio.move_on_after(SETTLE):
            while end != start:
                await trio.sleep(0.5)
                end = levels(await stack.snapshot())
        samples.append((trio.current_time() - started, await stack.snapshot()))
    return checker, samples, start, end


def verdict(
    args: argparse.Namespace,
    checker: Checker,
    samples: list[tuple[float, Snapshot]],
    start: dict[str, tuple[int, int, int]],
    end: dict[str, tuple[int, int, int]],
) -> int:
    problems: list[str] = []
    by_kind = ", ".join(f"{kind} {checker.ok[kind]}" for kind in KINDS)
    excused = len(checker.failed) - len(checker.unexcused_failures())
    print(f"exchanges checked: {checker.total} ({by_kind}); {len(checker.cuts)} link cuts")
    print(f"failed during a link cut (excused): {excused}")
    problems += [f"wrong response: {w}" for w in checker.wrong[:20]]
    problems += [f"failure without a link cut: {f}" for f in checker.unexcused_failures()[:20]]
    for name in start:
        (s_streams, s_tasks, s_fds), (e_streams, e_tasks, e_fds) = start[name], end[name]
        print(
            f"{name}: streams {s_streams} -> {e_streams}, tasks {s_tasks} -> {e_tasks}, fds {s_fds} -> {e_fds}"
        )
        if end[name] != (0, s_tasks, s_fds):
            problems.append(f"{name} did not return to its starting levels: {start[name]} -> {end[name]}")
        warm = next((snap for t, snap in samples if t >= min(args.warmup, args.duration / 2)), samples[0][1])
        rss_warm, rss_end = warm.get(name, "rss_bytes"), samples[-1][1].get(name, "rss_bytes")
        growth = (rss_end - rss_warm) / rss_warm
        print(
            f"{name}: RSS {rss_warm / 2**20:.1f} MiB after warm-up -> {rss_end / 2**20:.1f} MiB ({growth:+.1%})"
        )
        if growth >= RSS_GROWTH_LIMIT:
            problems.append(f"{name}: RSS grew {growth:.1%} after the warm-up (limit {RSS_GROWTH_LIMIT:.0%})")
    for problem in problems:
        print("PROBLEM:", problem)
    print("VERDICT:", "PASS" if not problems else "FAIL")
    return 0 if not problems else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=600, metavar="SECONDS", help="traffic time (default 600)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent client loops (default 8)")
    parser.add_argument(
        "--cut-interval", type=float, default=30, metavar="SECONDS", help="link cuts (default ~30)"
    )
    parser.add_argument("--sample-interval", type=float, default=5, metavar="SECONDS")
    parser.add_argument(
        "--warmup", type=float, default=60, metavar="SECONDS", help="RSS baseline (default 60)"
    )
    parser.add_argument("--table-every", type=float, default=30, metavar="SECONDS", help="table row spacing")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--log", default=os.path.join(tempfile.gettempdir(), "rtunnel-soak.log"), help="the processes' logs"
    )
    return soak(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
