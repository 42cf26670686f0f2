"""Throughput of the sans-IO core: two `Connection`s back to back in memory, one thread, no I/O.

Usage: python bench/protocol_bench.py [--seconds S] [--profile CASE]

Cases:
- bulk: the initiator streams 1 MiB buffers on 1 or 100 streams, pulled in 256 KiB messages (the runtime's
  MAX_MESSAGE), with max_frame_size 16 KiB or 64 KiB and large windows (16 MiB per stream, 64 MiB connection).
- tiny: 16-byte DATA frames. With 1 stream the sender pulls after every write (otherwise writes would coalesce
  into one frame); with 100 streams one pull yields one frame per stream. The receiver gets the sender's output
  in batches of about 64 frames, as a WebSocket message would carry them.

In every case the receiver acknowledges each DataReceived at once, as the runtime does when the application
reads, and its WINDOW_UPDATEs are fed back to the sender. Times include both endpoints (one CPU does all).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import Connection, DataReceived, RequestHead, Role, Settings

MESSAGE = 256 * 1024
STREAM_WINDOW = 16 * 1024 * 1024
CONNECTION_WINDOW = 64 * 1024 * 1024
HEAD = RequestHead(b"POST", b"/upload", ((b"Host", b"bench"),))


def _pair(max_frame_size: int, n_streams: int) -> tuple[Connection, Connection, list[int]]:
    settings = Settings(
        max_frame_size=max_frame_size,
        initial_stream_window=STREAM_WINDOW,
        connection_window=CONNECTION_WINDOW,
        max_concurrent_streams=1000,
    )
    sender = Connection(Role.ACCEPTOR, settings)
    receiver = Connection(Role.DIALER, settings)
    receiver.receive_data(sender.data_to_send())
    sender.receive_data(receiver.data_to_send())
    sids = [sender.open_stream(HEAD) for _ in range(n_streams)]
    receiver.receive_data(sender.data_to_send())
    return sender, receiver, sids


def _deliver(receiver: Connection, sender: Connection, data: bytes) -> tuple[int, int]:
    """Feed `data` to the receiver, acknowledge like the runtime, return (octets, DATA frames) delivered."""
    octets = frames = 0
    ack = receiver.acknowledge_received_data
    for event in receiver.receive_data(data):
        if type(event) is DataReceived:
            size = len(event.data)
            ack(event.stream_id, size)
            octets += size
            frames += 1
    back = receiver.data_to_send()
    if back:
        sender.receive_data(back)
    return octets, frames


def bulk(max_frame_size: int, n_streams: int, seconds: float) -> tuple[float, int, int]:
    sender, receiver, sids = _pair(max_frame_size, n_streams)
    chunk = memoryview(bytes(1 << 20))
    octets = frames = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(20):
            for sid in sids:
                if sender.outbound_buffered(sid) < len(chunk):
                    sender.send_data(sid, chunk)
            data = sender.data_to_send(MESSAGE)
            got, count = _deliver(receiver, sender, data)
            octets += got
            frames += count
        if time.perf_counter() >= deadline:
            break
    return time.perf_counter() - start, octets, frames


def tiny(n_streams: int, seconds: float, size: int = 16, batch_frames: int = 64) -> tuple[float, int, int]:
    sender, receiver, sids = _pair(16384, n_streams)
    piece = bytes(size)
    pulls_per_batch = max(1, batch_frames // n_streams)
    octets = frames = 0
    send, pull = sender.send_data, sender.data_to_send
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(20):
            out = []
            for _ in range(pulls_per_batch):
                for sid in sids:
                    send(sid, piece)
                out.append(pull(MESSAGE))
            got, count = _deliver(receiver, sender, b"".join(out))
            octets += got
            frames += count
        if time.perf_counter() >= deadline:
            break
    return time.perf_counter() - start, octets, frames


CASES: dict[str, Callable[[float], tuple[float, int, int]]] = {
    "bulk-16k-1": lambda s: bulk(16384, 1, s),
    "bulk-16k-100": lambda s: bulk(16384, 100, s),
    "bulk-64k-1": lambda s: bulk(65536, 1, s),
    "bulk-64k-100": lambda s: bulk(65536, 100, s),
    "tiny-16b-1": lambda s: tiny(1, s),
    "tiny-16b-100": lambda s: tiny(100, s),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each case")
    parser.add_argument("--profile", choices=sorted(CASES), help="profile one case with cProfile instead")
    args = parser.parse_args()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(CASES[args.profile], args.seconds)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
        return
    print(f"{'case':<14} {'MB/s':>9} {'frames/s':>12} {'MB moved':>9}")
    for name, case in CASES.items():
        elapsed, octets, frames = case(args.seconds)
        print(
            f"{name:<14} {octets / elapsed / 1e6:>9.0f} {frames / elapsed:>12,.0f} {octets / 1e6:>9.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
