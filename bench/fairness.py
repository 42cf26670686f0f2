"""Fairness under a hostile body shape: another client's latency while one uploads in 1-byte chunks.

    python bench/fairness.py [--requests 300] [--rtunnel-src DIR]

Starts a small upstream (this script with --upstream), `rtunnel serve` + `rtunnel dial` (default options, the
relay's per-address limits off), then measures GET /small from 127.0.0.1 on one keep-alive connection: first
idle, then while an attacker (this script with --attack, from 127.0.0.2) sends `POST` with
`Transfer-Encoding: chunked` and `1\\r\\nX\\r\\n` as fast as the relay takes it. Prints p50/p99 of both phases
and how fast the relay took the attacker's chunks. `--rtunnel-src` runs another checkout (e.g. the code before a change).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h11
import trio
from procs import Processes

ROOT = Path(__file__).resolve().parents[1]
LISTENING = r"listening http=(\S+):(\d+) agents=(\S+):(\d+)"
SMALL = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"


# -- the upstream: 200 "ok" to anything, after reading its body --------------------------------------------


async def _serve_upstream(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data:
                    return
            elif isinstance(event, h11.EndOfMessage):
                headers = [(b"Content-Length", b"2")]
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
                await stream.send_all(
                    (conn.send(h11.Data(data=b"ok")) or b"") + (conn.send(h11.EndOfMessage()) or b"")
                )
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
    except (trio.BrokenResourceError, h11.ProtocolError):
        return


async def upstream() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print("listening", listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(_serve_upstream, listeners)


# -- the attacker ---------------------------------------------------------------------------------------------


def attack(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
    sock.sendall(b"POST /upload HTTP/1.1\r\nHost: bench\r\nTransfer-Encoding: chunked\r\n\r\n")
    block = b"1\r\nX\r\n" * 10_000
    sent, started = 0, time.monotonic()
    try:
        while True:
            sock.sendall(block)
            sent += 10_000
            if sent % 100_000 == 0:
                print(f"chunks {sent} at {time.monotonic() - started:.3f}", flush=True)
    except (BrokenPipeError, ConnectionResetError):
        return


# -- the measurement ----------------------------------------------------------------------------------------


def latencies(port: int, count: int) -> list[float]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for _ in range(count):
        started = time.perf_counter()
        sock.sendall(SMALL)
        data = b""
        while not data.endswith(b"\r\n\r\nok"):
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the relay closed the connection")
            data += chunk
        out.append((time.perf_counter() - started) * 1000)
    sock.close()
    return out


def summary(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{name:>14}: p50 {statistics.median(ordered):8.2f} ms   p99 {p99:8.2f} ms   (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rtunnel-src", type=Path, default=ROOT)
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--attack", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        trio.run(upstream)
        return
    if args.attack:
        attack(args.attack)
        return
    procs = Processes(Path(tempfile.mkdtemp(prefix="rtunnel-fairness-")))
    try:
        me = [sys.executable, str(Path(__file__).resolve())]
        up = procs.start("upstream", [*me, "--upstream"])
        up_port = int(procs.wait_line("upstream", up, r"listening (\d+)").group(1))
        env = dict(
            os.environ, PYTHONPATH=str(args.rtunnel_src.resolve()), RTUNNEL_TOKEN=secrets.token_urlsafe(24)
        )
        cmd = [sys.executable, "-m", "rtunnel"]
        off = ["--max-connections-per-ip", "0", "--max-exchanges-per-ip", "0"]
        relay = procs.start(
            "relay", [*cmd, "serve", "--http", "127.0.0.1:0", "--agents", "127.0.0.1:0", *off], env=env
        )
        match = procs.wait_line("relay", relay, LISTENING)
        http_port, agents_port = int(match.group(2)), int(match.group(4))
        dial = ["dial", f"ws://127.0.0.1:{agents_port}", "--upstream", f"http://127.0.0.1:{up_port}"]
        agent = procs.start("agent", [*cmd, *dial], env=env)
        procs.wait_line("relay", relay, "agent connected")
        latencies(http_port, 50)  # warm-up
        idle = latencies(http_port, args.requests)
        attacker = procs.start("attacker", [*me, "--attack", str(http_port)])
        procs.wait_line("attacker", attacker, r"chunks \d+")
        during = latencies(http_port, args.requests)
        print(summary("idle", idle))
        print(summary("during attack", during))
        procs.stop_all()  # the relay logs the upload (bytes in, duration) when it ends
        upload = re.search(r"POST /upload \d+ in=(\d+) .* ([\d.]+)ms", procs.log_text("relay"))
        if upload:
            rate = int(upload.group(1)) / float(upload.group(2)) * 1000
            print(f"{'attacker':>14}: {rate:.0f} one-byte chunks/s taken by the relay")
        del agent
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
