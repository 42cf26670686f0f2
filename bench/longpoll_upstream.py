"""The scale benchmark's long-polls (bench/run.py): an upstream (trio + h11) and the client that floods it.

    python bench/longpoll_upstream.py [--port 0] [--max-hold SECONDS]

Prints ``listening PORT`` on stdout once it accepts connections.

- ``GET /poll``: held (no response yet) until ``POST /release`` or ``--max-hold`` seconds, then ``200 released``.
  Holding until an explicit release, rather than for a fixed time, guarantees that every exchange of the
  benchmark is open at the same moment, however long the clients took to connect.
- ``GET /stats``: ``held=N served=M`` (how many polls are waiting / were answered).
- ``POST /release``: answers every waiting poll, and the ones arriving later at once.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import h11
import trio

READ_SIZE = 65536


class State:
    def __init__(self, max_hold: float) -> None:
        self.max_hold = max_hold
        self.held = 0
        self.served = 0
        self.released = trio.Event()


async def respond(conn: h11.Connection, stream: trio.SocketStream, status: int, body: bytes) -> None:
    headers = [(b"Content-Type", b"text/plain"), (b"Content-Length", str(len(body)).encode())]
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data = (data or b"") + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(data)


async def next_event(conn: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(READ_SIZE))


async def handle(stream: trio.SocketStream, state: State) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = await next_event(conn, stream)
            if not isinstance(event, h11.Request):
                return
            while not isinstance(await next_event(conn, stream), h11.EndOfMessage):
                pass  # a request body is read and dropped
            path = event.target.split(b"?", 1)[0]
            if path == b"/poll":
                state.held += 1
                try:
                    with trio.move_on_after(state.max_hold):
                        await state.released.wait()
                finally:
                    state.held -= 1
                state.served += 1
                await respond(conn, stream, 200, b"released\n")
            elif path == b"/stats":
                await respond(conn, stream, 200, f"held={state.held} served={state.served}\n".encode())
            elif path == b"/release" and event.method == b"POST":
                state.released.set()
                await respond(conn, stream, 200, b"ok\n")
            else:
                await respond(conn, stream, 404, b"not found\n")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def main(port: int, max_hold: float) -> None:
    state = State(max_hold)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(handle, state=state), port, host="127.0.0.1")
        )
        print(f"listening {listeners[0].socket.getsockname()[1]}", flush=True)


# --------------------------------------------------------------------------------------------------------
# the client side, used by bench/run.py


async def ask(port: int, request: bytes) -> bytes:
    """One exchange on a fresh connection that the server closes (Connection: close)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(READ_SIZE):
            data += chunk
    return data


async def _poll(port: int, limiter: trio.CapacityLimiter, outcome: dict[str, float]) -> None:
    try:
        async with limiter:  # bound the connect burst: a SYN dropped from a full backlog costs 1 s
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /poll HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\n\r\n")
            data = b""
            while not data.endswith(b"\r\n\r\nreleased\n"):
                chunk = await stream.receive_some(READ_SIZE)
                if not chunk:
                    break
                data += chunk
        key = "completed" if data.startswith(b"HTTP/1.1 200") and data.endswith(b"released\n") else "bad"
    except (OSError, trio.BrokenResourceError) as exc:
        key = f"error {type(exc).__name__}"
    outcome[key] = outcome.get(key, 0) + 1


async def hold_many(
    relay_port: int, upstream_port: int, count: int, all_held: Callable[[], None]
) -> dict[str, float]:
    """Open `count` polls through the tunnel at `relay_port`; once the upstream holds them all (or the
    rest failed), call `all_held()`, release them, and wait until every one completed."""
    outcome: dict[str, float] = {"completed": 0}
    started = trio.current_time()
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(256)
            for _ in range(count):
                nursery.start_soon(_poll, relay_port, limiter, outcome)
            held = 0
            while held < count:
                await trio.sleep(0.25)
                stats = await ask(
                    upstream_port, b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                match = re.search(rb"held=(\d+)", stats)
                held = int(match.group(1)) if match else 0
                finished = sum(v for k, v in outcome.items())
                if finished and held + finished >= count:
                    break  # some failed: they will never be held
            outcome["held_at_once"] = held
            outcome["seconds_to_open_all"] = trio.current_time() - started
            all_held()
            release = b"POST /release HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            await ask(upstream_port, release)
    outcome["seconds_total"] = trio.current_time() - started
    return outcome


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name, description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-hold", type=float, default=120.0, metavar="SECONDS")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, args.port, args.max_hold)
