"""The link's receiving side alone: CPU seconds per GB that one `Transport.receive()` loop spends on messages of a
few sizes, for this checkout and for other revisions or checkouts, side by side.

    .venv/bin/python bench/wsreceive.py                  # this checkout
    .venv/bin/python bench/wsreceive.py c364f78 ../other # and a column for each revision or directory

A thread of the same process writes pre-built frames (masked towards the relay's side, unmasked towards the
agent's) into a socket pair; only the receiving thread's CPU time counts (`time.thread_time`), best of five
runs, each in a fresh interpreter. A whole tunnel's figures are bench/run.py's; this one isolates the link, whose
share of a tunnel's CPU is small enough to drown in the run-to-run noise of a bulk transfer.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = (200, 65_545, 262_144)  # a small exchange's message; one 64 KiB DATA frame; a batch of frames
RUNS = 5


def _child(src: str, side: str, size: int, count: int) -> None:
    sys.path.insert(0, src)
    import socket
    import threading
    import time

    import trio
    from websockets.client import ClientProtocol
    from websockets.frames import Frame, Opcode
    from websockets.protocol import State
    from websockets.server import ServerProtocol
    from websockets.uri import parse_uri

    from rtunnel.link.wslink import Transport

    server = side == "relay"
    frame = Frame(Opcode.BINARY, os.urandom(size)).serialize(mask=server)

    def write(sock: socket.socket) -> None:
        left = count
        while left:
            batch = min(64, left)
            sock.sendall(frame * batch)
            left -= batch
        sock.close()

    async def receive() -> None:
        ours, theirs = socket.socketpair()
        proto: ServerProtocol | ClientProtocol
        if server:
            proto = ServerProtocol(state=State.OPEN, max_size=1 << 25)
        else:
            proto = ClientProtocol(parse_uri("ws://relay/"), state=State.OPEN, max_size=1 << 25)
        link = Transport(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), proto, "bench", 1.0)
        writer = threading.Thread(target=write, args=(theirs,))
        start = time.thread_time()
        writer.start()
        received = 0
        for _ in range(count):
            received += len(await link.receive())
        elapsed = time.thread_time() - start
        writer.join()
        print(elapsed / (received / 1e9))

    trio.run(receive)


def _source(spec: str, scratch: Path) -> str:
    """A directory with rtunnel/ and protocol/ in it: `spec` itself, or a git revision unpacked."""
    if Path(spec, "rtunnel").is_dir():
        return spec
    target = scratch / spec.replace("/", "_")
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", spec, "rtunnel", "protocol"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return str(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare", nargs="*", help="git revisions or checkout directories to compare with")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        src, side, size, count = args.child
        _child(src, side, int(size), int(count))
        return
    with tempfile.TemporaryDirectory() as scratch:
        sources = [str(ROOT), *(_source(spec, Path(scratch)) for spec in args.compare)]
        names = ["this checkout", *args.compare]
        print("| receiving side | message | " + " | ".join(f"{n}, CPU s/GB" for n in names) + " |")
        print("|---|---:|" + "---:|" * len(names))
        for side in ("relay", "agent"):
            for size in SIZES:
                count = max(20_000, 200_000_000 // size)
                figures = []
                for src in sources:
                    runs = [
                        float(
                            subprocess.run(
                                [sys.executable, __file__, "--child", src, side, str(size), str(count)],
                                check=True,
                                capture_output=True,
                                text=True,
                            ).stdout
                        )
                        for _ in range(RUNS)
                    ]
                    figures.append(f"{min(runs):.3f}")
                print(f"| {side} (masked: {side == 'relay'}) | {size:,} B | " + " | ".join(figures) + " |")


if __name__ == "__main__":
    main()
