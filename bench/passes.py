"""Count trio scheduler passes (task steps) per request on each end of the tunnel, one request at a time.

A relay, an agent, a minimal upstream (fixed 100-byte response) and a keep-alive client all run in this one trio
run; a trio Instrument counts `before_task_step` per task and charges each step to the end (relay, agent,
upstream, client) whose task tree it belongs to. Under `-c1` load most of a small exchange's cost beyond parsing
is these passes (each is a trip through the run loop), so this is the figure to watch when changing how tasks
hand work to each other.

    .venv/bin/python bench/passes.py [--requests 2000] [-c 1] [--body 100] [--tls] [--access-log off]

The CPU time it reports (the whole process, all four ends) is a steadier A/B figure than bench/run.py's on a
busy machine: one process on one core, so other load shifts it less. Run it from another source tree with
--src that/tree to compare revisions.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio
import trio.lowlevel

TOKEN = "passes-token"


def _name(task: trio.lowlevel.Task) -> str:
    """The task's function, or the one a wrapper (the mux's _guard) runs."""
    name = task.name.rsplit(".", 2)[-1]
    frame = getattr(task.coro, "cr_frame", None)
    inner = frame.f_locals.get("task") if frame is not None else None
    return f"{name}({inner.__name__})" if callable(inner) else name


class StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()
        self.by_task: collections.Counter[tuple[str, str]] = collections.Counter()
        self.io_waits = 0
        self.messages: collections.Counter[tuple[str, str]] = collections.Counter()
        self._end_of: dict[trio.lowlevel.Task, str] = {}
        self.roots: dict[trio.lowlevel.Task, str] = {}

    def _end(self, task: trio.lowlevel.Task) -> str:
        end = self._end_of.get(task)
        if end is None:
            walk: trio.lowlevel.Task | None = task
            end = "other"
            while walk is not None:
                if walk in self.roots:
                    end = self.roots[walk]
                    break
                nursery = walk.parent_nursery
                walk = nursery.parent_task if nursery is not None else None
            self._end_of[task] = end
        return end

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        end = self._end(task)
        self.steps[end] += 1
        self.by_task[(end, _name(task))] += 1

    def before_io_wait(self, timeout: float) -> None:
        self.io_waits += 1

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self._end_of.pop(task, None)

    def reset(self) -> None:
        self.steps.clear()
        self.by_task.clear()
        self.messages.clear()
        self.io_waits = 0


async def upstream(body: bytes, *, task_status: trio.TaskStatus[int]) -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s" % (
        len(body),
        body,
    )

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    await stream.send_all(response)
        except trio.BrokenResourceError:
            return

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def client(port: int, count: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    request = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"
    for _ in range(count):
        await stream.send_all(request)
        buf = b""
        while True:
            buf += await stream.receive_some(65536)
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if sep:
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                if len(rest) >= length:
                    break
    await stream.aclose()


def make_cert(tmp: Path) -> tuple[str, str]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path, ca_path = tmp / "cert.pem", tmp / "key.pem", tmp / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return str(cert_path), str(ca_path)


def count_messages(counter: StepCounter) -> None:
    """Count WebSocket messages each end sends and receives, and what the sends carry (frame types)."""
    from rtunnel.link import wslink

    send, receive = wslink.Transport.send, wslink.Transport.receive

    def frames(message: bytes) -> str:
        names, offset = [], 0
        while offset + 9 <= len(message):
            length = int.from_bytes(message[offset : offset + 3], "big")
            names.append(f"{message[offset + 3]:x}")
            offset += 9 + length
        return "+".join(names)

    async def counted_send(self: wslink.Transport, message: bytes) -> None:
        end = counter._end(trio.lowlevel.current_task())
        counter.messages[(end, "sent " + frames(bytes(message)))] += 1
        await send(self, message)

    async def counted_receive(self: wslink.Transport) -> bytes:
        message = await receive(self)
        counter.messages[(counter._end(trio.lowlevel.current_task()), "received")] += 1
        return message

    wslink.Transport.send = counted_send  # type: ignore[method-assign]
    wslink.Transport.receive = counted_receive  # type: ignore[method-assign]


async def main(args: argparse.Namespace, counter: StepCounter) -> None:
    import rtunnel

    counter.roots[trio.lowlevel.current_task()] = "client"
    counter._end_of.clear()
    serve_options: dict[str, object] = {"access_log": args.access_log}
    dial_options: dict[str, object] = {"access_log": args.access_log}
    if args.tls:
        tmp = Path(tempfile.mkdtemp())
        cert, ca = make_cert(tmp)
        serve_options.update(tls_cert=cert, tls_key=cert)
        dial_options.update(ca=ca)
    async with trio.open_nursery() as nursery:

        async def run_as(end: str, fn: object, *, task_status: trio.TaskStatus[object]) -> None:
            counter.roots[trio.lowlevel.current_task()] = end
            await fn(task_status=task_status)  # type: ignore[operator]

        port = await nursery.start(run_as, "upstream", partial(upstream, b"x" * args.body))
        where = await nursery.start(
            run_as,
            "relay",
            partial(rtunnel.serve, http="127.0.0.1:0", agents="127.0.0.1:0", token=TOKEN, **serve_options),
        )
        await nursery.start(
            run_as,
            "agent",
            partial(
                rtunnel.dial,
                [where.agents_url],  # type: ignore[attr-defined]
                upstream=f"http://127.0.0.1:{port}",
                token=TOKEN,
                **dial_options,
            ),
        )
        http_port = where.http[1]  # type: ignore[attr-defined]
        await client(http_port, 200)  # warm-up: pools, caches
        await trio.sleep(0.2)
        counter.reset()
        started, cpu = trio.current_time(), time.process_time()
        async with trio.open_nursery() as clients:
            for _ in range(args.concurrency):
                clients.start_soon(client, http_port, args.requests // args.concurrency)
        elapsed, cpu = trio.current_time() - started, time.process_time() - cpu
        steps = dict(counter.steps)
        by_task = dict(counter.by_task)
        io_waits = counter.io_waits
        messages = dict(counter.messages)
        nursery.cancel_scope.cancel()
    n = args.requests // args.concurrency * args.concurrency
    print(f"rtunnel from {Path(rtunnel.__file__).parent}")
    print(
        f"{n} requests at -c{args.concurrency}: {elapsed / n * 1e6:.0f} us of wall-clock time, "
        f"{cpu / n * 1e6:.0f} us of CPU each (all four ends in one process)"
    )
    print(f"run-loop passes (io waits) per request: {io_waits / n:.2f}")
    for end in ("relay", "agent", "upstream", "client", "other"):
        if end in steps:
            print(f"  {end:9s} task steps per request: {steps[end] / n:.2f}")
            for (e, name), count in sorted(by_task.items(), key=lambda kv: -kv[1]):
                if e == end and count / n >= 0.05:
                    print(f"      {count / n:5.2f}  {name}")
            for (e, what), count in sorted(messages.items()):
                if e == end and count / n >= 0.05:
                    print(f"      {count / n:5.2f}  messages {what}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--body", type=int, default=100)
    parser.add_argument("--concurrency", "-c", type=int, default=1, help="client connections at once")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--access-log", default="on")
    parser.add_argument("--messages", action="store_true", help="also count WebSocket messages (slower)")
    parser.add_argument("--src", help="import rtunnel from this source tree (default: the installed one)")
    args = parser.parse_args()
    if args.src:
        sys.path.insert(0, args.src)
    counter = StepCounter()
    if args.messages:
        count_messages(counter)
    trio.run(main, args, counter, instruments=[counter])
    sys.exit(0)
