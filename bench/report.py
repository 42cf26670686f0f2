"""The tables and verdicts bench/run.py prints: medians of the rounds, ratios to pproxy and to ssh -R, targets."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

Results = dict[str, dict[str, list[float]]]  # figure -> route name -> one value per round
PPROXY, SSH = "pproxy", "ssh -R"
MAIN = "rtunnel"  # the targets' route (ws://, this checkout)
TLS, LOG_OFF = f"{MAIN} wss", f"{MAIN} log off"

ROWS = [  # key, label, unit, higher is better
    ("small_rps", "small (100 B), wrk -t1 -c64: requests/s", "req/s", True),
    ("cpu_small", "tunnel CPU per small request (-c64), us", "us", False),
    ("small_p99", "small, -c64: p99 latency, ms", "ms", False),
    ("c1_p50", "one at a time (-c1): p50 latency, ms", "ms", False),
    ("c1_p99", "one at a time (-c1): p99 latency, ms", "ms", False),
    ("cpu_c1", "tunnel CPU per -c1 request, us", "us", False),
    ("16k_rps", "16 KiB, wrk -t1 -c16: requests/s", "req/s", True),
    ("cpu_16k", "tunnel CPU per 16 KiB request, us", "us", False),
    ("download_mbps", "bulk download: MB/s", "MB/s", True),
    ("cpu_gb_download", "tunnel CPU per GB downloaded, s", "s", False),
    ("upload_mbps", "bulk upload: MB/s", "MB/s", True),
    ("cpu_gb_upload", "tunnel CPU per GB uploaded, s", "s", False),
    ("fair_p99", "-c1 p99 during a bulk download, ms", "ms", False),
    ("fair_ratio", "that p99 / idle -c1 p99", "x", False),
]
CPU_KEYS = ("cpu_small", "cpu_c1", "cpu_16k", "cpu_gb_download", "cpu_gb_upload")


def median(results: Results, key: str, route: str) -> float | None:
    values = results.get(key, {}).get(route)
    return statistics.median(values) if values else None


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("req/s", "MB/s", "us"):
        return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def figure(results: Results, key: str, route: str) -> float | None:
    if key == "fair_ratio":
        loaded, idle = median(results, "fair_p99", route), median(results, "c1_p99", route)
        return loaded / idle if loaded is not None and idle else None
    if key in CPU_KEYS:  # the sum of both ends (each end's median)
        parts = [median(results, k, route) for k in results if k.startswith(key + ":")]
        values = [p for p in parts if p is not None]
        return sum(values) if values else None
    return median(results, key, route)


def ratio(results: Results, key: str, mine: str, theirs: str) -> float | None:
    a, b = figure(results, key, mine), figure(results, key, theirs)
    return a / b if a is not None and b else None


def _markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def ratio_columns(routes: list[str]) -> list[tuple[str, str, str]]:
    """(label, mine, theirs): each rtunnel route to pproxy and to ssh -R; rtunnel to its log-off and
    --compare variants."""
    columns = []
    for name in routes:
        if name.startswith(MAIN) and name != LOG_OFF:
            columns += [(f"{name} / {o}", name, o) for o in (PPROXY, SSH) if o in routes]
    if MAIN in routes:
        others = [n for n in routes if n == LOG_OFF or n.startswith(MAIN + "@")]
        columns += [(f"{MAIN} / {o}", MAIN, o) for o in others]
    return columns


def table(results: Results, routes: list[str]) -> str:
    """Every figure of every route; then the ratios; then each tunnel's CPU split between its two ends."""
    measured = [row for row in ROWS if any(figure(results, row[0], n) is not None for n in routes)]
    rows = [[label] + [fmt(figure(results, k, n), unit) for n in routes] for k, label, unit, _ in measured]
    lines = _markdown(["figure", *routes], rows)
    columns = ratio_columns(routes)
    if columns:
        rows = [
            [label] + [fmt(ratio(results, k, a, b), "x") for _, a, b in columns]
            for k, label, _, _ in measured
        ]
        lines += ["", *_markdown(["ratio", *(c[0] for c in columns)], rows)]
    tunnels = [n for n in routes if any(k.startswith("cpu_") for k in results if n in results[k])]
    rows = []
    for key, label, unit, _ in measured:
        if key in CPU_KEYS:
            cells = [f"{fmt(median(results, f'{key}:relay', n), unit)} + {fmt(median(results, f'{key}:agent', n), unit)}" for n in tunnels]  # fmt: skip
            rows.append([label, *cells])
    if tunnels:
        lines += ["", "CPU by end, relay + agent (ssh -R: sshd + ssh; pproxy: public end + backward end):"]
        lines += _markdown(["CPU", *tunnels], rows)
    return "\n".join(lines)


def scale_text(report: dict[str, float]) -> str:
    if not report:
        return "scale: not run, or failed (see the messages above)"
    count = int(report["count"])
    lines = [
        f"scale ({MAIN}): {count:,} concurrent long-polls through one agent: {int(report['completed']):,} "
        f"completed, {int(report['failed'])} failed; {int(report['held_at_once']):,} held by the upstream at once "
        f"({report['seconds_to_open_all']:.1f} s to open them all, {report['seconds_total']:.1f} s in total)."
    ]
    for role in ("relay", "agent"):
        lines.append(
            f"  {role}: RSS {report[f'{role}_rss_base_kib'] / 1024:.1f} MiB idle -> "
            f"{report[f'{role}_rss_held_kib'] / 1024:.1f} MiB with all held = "
            f"{report[f'{role}_kib_per_stream']:.1f} KiB per stream; peak (VmHWM) {report[f'{role}_hwm_kib'] / 1024:.1f} MiB"
        )
    return "\n".join(lines)


def _verdict(value: float | None, limit: float, at_least: bool) -> str:
    if value is None:
        return "-"
    met = value >= limit if at_least else value <= limit
    return f"{fmt(value, 'x')} {'met' if met else 'MISSED'}"


def targets_text(results: Results, routes: list[str], scale: dict[str, float]) -> str:
    """Issue 11's targets, for rtunnel (ws://, where they apply) and beside it the other rtunnel routes."""
    candidates = [n for n in routes if n.startswith(MAIN) and n != LOG_OFF]

    def best_peer(key: str, route: str) -> float | None:  # to the better of ssh -R and pproxy
        peers = [v for v in (figure(results, key, p) for p in (SSH, PPROXY)) if v is not None]
        mine = figure(results, key, route)
        return mine / max(peers) if mine is not None and peers else None

    checks = [  # label, value of a route, limit, the value must be >= the limit
        ("1. tunnel CPU per small request <= 4x pproxy's", lambda n: ratio(results, "cpu_small", n, PPROXY), 4.0, False),
        ("2. -c1 p50 <= 4x pproxy's", lambda n: ratio(results, "c1_p50", n, PPROXY), 4.0, False),
        ("3. -c64 small requests/s >= 0.25x pproxy's", lambda n: ratio(results, "small_rps", n, PPROXY), 0.25, True),
        ("3. 16 KiB -c16 requests/s >= 0.25x pproxy's", lambda n: ratio(results, "16k_rps", n, PPROXY), 0.25, True),
        ("4. bulk download >= 1.0x the better of ssh -R, pproxy", lambda n: best_peer("download_mbps", n), 1.0, True),
        ("4. bulk upload >= 1.0x the better of ssh -R, pproxy", lambda n: best_peer("upload_mbps", n), 1.0, True),
        ("5. -c1 p99 during a bulk download <= 2x idle", lambda n: figure(results, "fair_ratio", n), 2.0, False),
        ("access log: CPU per small request <= 1.10x log off", lambda n: ratio(results, "cpu_small", n, LOG_OFF) if n == MAIN else None, 1.10, False),
    ]  # fmt: skip
    rows = [[label] + [_verdict(value(n), limit, at_least) for n in candidates] for label, value, limit, at_least in checks]  # fmt: skip
    if scale and candidates:
        per = max(scale["relay_kib_per_stream"], scale["agent_kib_per_stream"])
        met = scale["failed"] == 0 and per < 20
        cell = f"{per:.1f} KiB/stream (max of both ends), {int(scale['failed'])} failed {'met' if met else 'MISSED'}"
        label = f"5. {int(scale['count']):,} long-polls, < 20 KiB RSS per stream each end"
        rows.insert(6, [label, cell] + ["-"] * (len(candidates) - 1))
    head = ["target (they apply to ws://)", *candidates]
    return "\n".join(["targets:", *_markdown(head, rows)])


def machine_text() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")  # fmt: skip
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {os.cpu_count()} CPUs ({model}), shared by the load generator (wrk/curl), nginx (1 worker) and "
        f"both tunnel ends; Linux {os.uname().release}; Python {sys.version.split()[0]}; all on 127.0.0.1; "
        f"load average {load}"
    )
