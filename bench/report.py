"""The tables and verdicts bench/run.py prints: medians, ratios to direct and to the better ssh -R variant."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

PATHS = ("direct", "ssh -N", "ssh -tt", "rtunnel")
Results = dict[str, dict[str, list[float]]]  # figure -> path name -> one value per round


def median(results: Results, key: str, path: str) -> float | None:
    values = results.get(key, {}).get(path)
    return statistics.median(values) if values else None


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("req/s", "MB/s"):
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


ROWS = [  # key, label, unit, higher is better
    ("small_rps", "small (100 B), wrk -c64: requests/s", "req/s", True),
    ("small_p50", "small, -c64: p50 latency (ms)", "ms", False),
    ("small_p99", "small, -c64: p99 latency (ms)", "ms", False),
    ("16k_rps", "16 KiB, -c16: requests/s", "req/s", True),
    ("c1_p50", "one at a time (-c1): p50 latency (ms)", "ms", False),
    ("c1_p99", "one at a time (-c1): p99 latency (ms)", "ms", False),
    ("download_mbps", "bulk download: MB/s", "MB/s", True),
    ("upload_mbps", "bulk upload: MB/s", "MB/s", True),
    ("fair_p99", "-c1 p99 during a bulk download (ms)", "ms", False),
    ("fair_ratio", "  fairness: that p99 / idle -c1 p99", "x", False),
    ("cpu_per_1k", "CPU s per 1,000 small requests (tunnel)", "s", False),
    ("cpu_per_gb_download", "CPU s per GB downloaded (tunnel)", "s", False),
    ("cpu_per_gb_upload", "CPU s per GB uploaded (tunnel)", "s", False),
]


def tunnel_cpu(results: Results, key: str, path: str) -> float | None:
    parts = [median(results, k, path) for k in results if k.startswith(key + ":")]
    values = [p for p in parts if p is not None]
    return sum(values) if values else None


def figure(results: Results, key: str, path: str) -> float | None:
    if key == "fair_ratio":
        loaded, idle = median(results, "fair_p99", path), median(results, "c1_p99", path)
        return loaded / idle if loaded is not None and idle else None
    if key.startswith("cpu_"):
        return tunnel_cpu(results, key, path)
    return median(results, key, path)


def anchor(results: Results, key: str, higher: bool) -> tuple[str, float | None]:
    """The better ssh variant for this figure."""
    candidates = [(figure(results, key, n), n) for n in ("ssh -N", "ssh -tt")]
    valid = [(v, n) for v, n in candidates if v is not None]
    if not valid:
        return "", None
    value, name = (max if higher else min)(valid)
    return name, value


def table(results: Results) -> str:
    head = (
        "| figure | direct | ssh -R -N | ssh -R -tt | rtunnel | rtunnel / direct | rtunnel / ssh -R (best) |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label, unit, higher in ROWS:
        values = {n: figure(results, key, n) for n in PATHS}
        mine = values["rtunnel"]
        direct = values["direct"]
        best_name, best = anchor(results, key, higher)
        vs_direct = fmt(mine / direct, "x") if mine is not None and direct else "-"
        vs_ssh = fmt(mine / best, "x") + f" ({best_name.split()[1]})" if mine is not None and best else "-"
        cells = [fmt(values[n], unit) for n in PATHS]
        lines.append(f"| {label} | {' | '.join(cells)} | {vs_direct} | {vs_ssh} |")
    split = []
    for key, label in (("cpu_per_1k", "per 1,000 small req"), ("cpu_per_gb_download", "per GB down"), ("cpu_per_gb_upload", "per GB up")):  # fmt: skip
        relay, agent = median(results, f"{key}:relay", "rtunnel"), median(results, f"{key}:agent", "rtunnel")
        split.append(f"{label}: relay {fmt(relay, 's')} s + agent {fmt(agent, 's')} s")
    lines.append("")
    lines.append("rtunnel CPU split: " + "; ".join(split) + ". ssh CPU = ssh client + sshd processes.")
    return "\n".join(lines)


def scale_text(report: dict[str, float]) -> str:
    if not report:
        return "scale: not run, or failed (see the messages above)"
    count = int(report["count"])
    lines = [
        f"scale: {count:,} concurrent long-polls through one agent: {int(report['completed']):,} completed, "
        f"{int(report['failed'])} failed; {int(report['held_at_once']):,} held by the upstream at once "
        f"({report['seconds_to_open_all']:.1f} s to open them all, {report['seconds_total']:.1f} s in total)."
    ]
    for role in ("relay", "agent"):
        lines.append(
            f"  {role}: RSS {report[f'{role}_rss_base_kib'] / 1024:.1f} MiB idle -> "
            f"{report[f'{role}_rss_held_kib'] / 1024:.1f} MiB with all held = "
            f"{report[f'{role}_kib_per_stream']:.1f} KiB per stream; peak (VmHWM) {report[f'{role}_hwm_kib'] / 1024:.1f} MiB"
        )
    return "\n".join(lines)


def targets_text(results: Results, scale: dict[str, float]) -> str:
    def ratio(key: str, higher: bool) -> float | None:
        mine = figure(results, key, "rtunnel")
        _, best = anchor(results, key, higher)
        return mine / best if mine is not None and best else None

    checks: list[tuple[str, float | None, float, bool]] = [  # label, value, limit, value must be >= limit
        ("bulk download >= 2x ssh -R", ratio("download_mbps", True), 2.0, True),
        ("bulk upload >= 2x ssh -R", ratio("upload_mbps", True), 2.0, True),
        ("small req/s >= 1.0x ssh -R", ratio("small_rps", True), 1.0, True),
        ("c1 p50 <= 1.2x ssh -R", ratio("c1_p50", False), 1.2, False),
        ("p99 during bulk <= 2x idle p99", figure(results, "fair_ratio", "rtunnel"), 2.0, False),
    ]
    lines = ["targets (rtunnel):"]
    for label, value, limit, at_least in checks:
        met = value is not None and (value >= limit if at_least else value <= limit)
        verdict = "-" if value is None else ("met" if met else "NOT met")
        lines.append(f"  {label}: {fmt(value, 'x')} -> {verdict}")
    if scale:
        per = max(scale["relay_kib_per_stream"], scale["agent_kib_per_stream"])
        met = scale["failed"] == 0 and per < 20
        lines.append(
            f"  {int(scale['count']):,} concurrent complete, < 20 KiB RSS per stream each end: "
            f"{int(scale['completed']):,} completed, max {per:.1f} KiB/stream -> {'met' if met else 'NOT met'}"
        )
    return "\n".join(lines)


def machine_text() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")  # fmt: skip
    return (
        f"machine: {os.cpu_count()} CPUs ({model}), shared by the load generator (wrk/curl), nginx (1 worker) and "
        f"both tunnel ends; Linux {os.uname().release}; Python {sys.version.split()[0]}; all on 127.0.0.1"
    )
