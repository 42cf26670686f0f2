"""A stand-in for the rtunnel CLI that follows its log contract, so the helpers in procs.py can be tested
before (and independently of) the real product. Not a tunnel: it only binds, logs and waits for SIGTERM.

Environment: FAKE_RTUNNEL_EXIT=N exit with N on SIGTERM; FAKE_RTUNNEL_CRASH=1 log and exit 3 at once;
FAKE_RTUNNEL_IGNORE_TERM=1 ignore SIGTERM (for the SIGKILL fallback).
"""

from __future__ import annotations

import os
import signal
import sys

import trio


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def _log(text: str) -> None:
    print(f"INFO rtunnel: {text}", file=sys.stderr, flush=True)


async def main(argv: list[str]) -> int:
    if os.environ.get("FAKE_RTUNNEL_CRASH") == "1":
        _log("boom")
        return 3
    handled = [signal.SIGINT]
    if os.environ.get("FAKE_RTUNNEL_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        handled.append(signal.SIGTERM)
    # The handler is in place before the ready line, as the real CLI must do too.
    with trio.open_signal_receiver(*handled) as signals:
        if argv[0] == "serve":
            binds = [_split(argv[argv.index(flag) + 1]) for flag in ("--http", "--agents")]
            listeners = [await trio.open_tcp_listeners(port, host=host) for host, port in binds]
            ports = [group[0].socket.getsockname()[1] for group in listeners]
            _log(f"listening http={binds[0][0]}:{ports[0]} agents={binds[1][0]}:{ports[1]}")
        else:
            _log(f"connected to {argv[1]} (upstream {argv[argv.index('--upstream') + 1]})")
        print("fake stdout line", flush=True)
        async for _ in signals:
            break
    _log("stopping")
    return int(os.environ.get("FAKE_RTUNNEL_EXIT", "0"))


if __name__ == "__main__":
    sys.exit(trio.run(main, sys.argv[1:]))
