"""A real HTTP/1.1 upstream server for end-to-end tests (trio + h11, server role, keep-alive).

Run it in-process (``port = await nursery.start(serve_upstream)``, or ``async with open_upstream() as up``) or
as a subprocess (``python tests/e2e/upstream.py --port 0`` prints ``READY <port>`` on stdout, SIGTERM or
SIGINT -> exit 0).

Every request body is read to the end (streamed, hashed on the fly, never buffered whole) before the
response starts, so every exchange leaves the connection reusable. Endpoints:

=================================  ==============================================================================
``GET /bytes/N``                   N deterministic bytes (:func:`iter_payload`), Content-Length, 64 KiB writes
``GET /chunked/N``                 the same bytes with chunked encoding
``POST|PUT /sha256``               ``{"sha256", "length"}`` of the request body
``ANY /echo...``                   method, target, http_version, headers (``[[name, value], ...]`` as on the
                                   wire, latin-1), body_length, body_sha256, connection, request_number
``GET /slow?chunks=K&interval=S``  chunked, ``chunk <i>\\n`` now and then one every S seconds
``GET /sse?n=K&interval=S``        text/event-stream, ``id: <i>`` / ``data: event <i>`` every S seconds
``GET /sleep?s=S``                 waits S seconds, then ``slept``
``POST /count/<key>``              increments the key's counter: ``{"key", "count"}``; ``GET /counts`` -> all
``GET /paths``                     JSON list of every request-target seen so far (this request included)
``GET /hold/<key>``                chunked: ``held\\n`` at once, ``released\\n`` after ``POST /release/<key>``
                                   (streaming tests without timing: read the first chunk, then release)
``GET /events/<key>?n=K``          text/event-stream of K events; event i+1 is written only after
                                   ``state.release("<key>.<i>")`` (or ``POST /release/<key>.<i>``)
``ANY /status/<code>``             that status (200..599), body ``status <code>\\n`` (none for 204/304)
``GET /abort``                     resets the connection (RST) without answering
``GET /abort?after=N``             head with Content-Length N+1, N bytes, then RST (a truncated response)
anything else                      200 ``text/plain`` body: the request-target
=================================  ==============================================================================

HEAD gets the GET head and no body. ``Expect: 100-continue`` is answered with 100 before the body is read.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import logging
import random
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from ..trio_helpers import unwrap_single

__all__ = [
    "Upstream",
    "UpstreamState",
    "first_mismatch",
    "iter_payload",
    "open_upstream",
    "payload",
    "payload_sha256",
    "serve_upstream",
]

log = logging.getLogger("upstream")

CHUNK: Final = 65536
# Every STAMP bytes the payload carries its own absolute offset (8 bytes, big endian), so a dropped,
# duplicated or reordered piece of 1 KiB or more is caught, and first_mismatch() can say where.
STAMP: Final = 1024
# Large enough that the upstream is never the component refusing big request heads in a test.
MAX_HEAD: Final = 1 << 20
_conn_ids = itertools.count(1)


# --- deterministic payloads -------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _base_block(n: int) -> bytes:
    return random.Random(n).randbytes(CHUNK)


def iter_payload(n: int) -> Iterator[bytes]:
    """The N bytes ``GET /bytes/N`` serves, in chunks of at most 64 KiB (deterministic from N)."""
    base = _base_block(n)
    for offset in range(0, n, CHUNK):
        chunk = bytearray(base[: min(CHUNK, n - offset)])
        for pos in range(0, len(chunk) - 7, STAMP):
            struct.pack_into(">Q", chunk, pos, offset + pos)
        yield bytes(chunk)


def payload(n: int) -> bytes:
    """All N bytes at once (for small N; use payload_sha256 for big ones)."""
    return b"".join(iter_payload(n))


def payload_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for chunk in iter_payload(n):
        digest.update(chunk)
    return digest.hexdigest()


def first_mismatch(data: bytes, n: int) -> int | None:
    """Offset of the first byte where ``data`` differs from payload(n) (length included), or None."""
    offset = 0
    for chunk in iter_payload(n):
        got = data[offset : offset + len(chunk)]
        if got != chunk:
            return offset + next(
                (i for i, (a, b) in enumerate(zip(got, chunk, strict=False)) if a != b), len(got)
            )
        offset += len(chunk)
    return None if len(data) == n else n


# --- state --------------------------------------------------------------------------------------------


@dataclass
class UpstreamState:
    """What the upstream saw; shared by every connection of one server."""

    paths: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    _releases: dict[str, trio.Event] = field(default_factory=dict)

    def release_event(self, key: str) -> trio.Event:
        return self._releases.setdefault(key, trio.Event())

    def release(self, key: str) -> None:
        """Let ``GET /hold/<key>`` finish (works before or after the hold request arrives)."""
        self.release_event(key).set()


@dataclass
class Upstream:
    """An in-process upstream: its port and its state (read ``paths``/``counts`` directly)."""

    port: int
    state: UpstreamState

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def paths(self) -> list[str]:
        return self.state.paths

    @property
    def counts(self) -> dict[str, int]:
        return self.state.counts


class _Abort(Exception):
    """Raised by a handler to reset the connection instead of finishing the response."""


# --- one connection -------------------------------------------------------------------------------------


class _Conn:
    def __init__(self, stream: trio.SocketStream, state: UpstreamState) -> None:
        self.stream = stream
        self.state = state
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.conn_id = next(_conn_ids)
        self.request_number = 0

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send_all(data)

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(CHUNK))
                continue
            return event  # type: ignore[return-value]

    async def respond(
        self,
        status: int,
        body: bytes | Iterator[bytes] | AsyncIterator[bytes],
        *,
        content_type: str = "text/plain",
        extra: list[tuple[str, str]] | None = None,
        chunked: bool = False,
        head_only: bool = False,
    ) -> None:
        headers = [("Content-Type", content_type), *(extra or [])]
        if isinstance(body, bytes):
            headers.append(("Content-Length", str(len(body))))
        elif chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        await self.send(h11.Response(status_code=status, headers=headers))
        if not head_only:
            if isinstance(body, bytes):
                if body:
                    await self.send(h11.Data(data=body))
            elif isinstance(body, Iterator):
                for chunk in body:
                    await self.send(h11.Data(data=chunk))
            else:
                async for chunk in body:
                    await self.send(h11.Data(data=chunk))
        await self.send(h11.EndOfMessage())

    async def respond_json(self, obj: Any, *, head_only: bool = False, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        await self.respond(status, body, content_type="application/json", head_only=head_only)

    async def serve(self) -> None:
        self.state.connections += 1
        while True:
            try:
                event = await self.next_event()
            except h11.RemoteProtocolError as exc:
                if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    await self.send(
                        h11.Response(
                            status_code=status,
                            headers=[("Content-Length", "0"), ("Connection", "close")],
                        )
                    )
                return
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                return
            self.request_number += 1
            await self.handle(event)
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return
            self.h11.start_next_cycle()

    async def read_body(self) -> tuple[int, str]:
        if self.h11.they_are_waiting_for_100_continue:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))
        digest = hashlib.sha256()
        length = 0
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                digest.update(event.data)
                length += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return length, digest.hexdigest()
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r} in request body")

    async def handle(self, request: h11.Request) -> None:
        target = request.target.decode("latin-1")
        self.state.paths.append(target)
        method = request.method.decode("latin-1")
        body_length, body_sha = await self.read_body()
        split = urlsplit(target)
        path, query = split.path, parse_qs(split.query)
        parts = path.split("/")
        head_only = method == "HEAD"
        get = method in ("GET", "HEAD")

        def num(name: str, default: float) -> float:
            return float(query.get(name, [str(default)])[0])

        if get and len(parts) == 3 and parts[1] in ("bytes", "chunked") and parts[2].isdigit():
            n = int(parts[2])
            chunked = parts[1] == "chunked"
            extra = [] if chunked else [("Content-Length", str(n))]
            await self.respond(
                200,
                iter_payload(n),
                content_type="application/octet-stream",
                extra=extra,
                chunked=chunked,
                head_only=head_only,
            )
        elif method in ("POST", "PUT") and path == "/sha256":
            await self.respond_json({"sha256": body_sha, "length": body_length})
        elif path.startswith("/echo"):
            await self.respond_json(
                {
                    "method": method,
                    "target": target,
                    "http_version": request.http_version.decode("latin-1"),
                    "headers": [
                        [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw_items()
                    ],
                    "body_length": body_length,
                    "body_sha256": body_sha,
                    "connection": self.conn_id,
                    "request_number": self.request_number,
                },
                head_only=head_only,
            )
        elif get and path == "/slow":
            await self.respond(
                200,
                _ticks(int(num("chunks", 5)), num("interval", 0.1), "chunk {i}\n"),
                chunked=True,
                head_only=head_only,
            )
        elif get and path == "/sse":
            await self.respond(
                200,
                _ticks(int(num("n", 5)), num("interval", 0.1), "id: {i}\ndata: event {i}\n\n"),
                content_type="text/event-stream",
                extra=[("Cache-Control", "no-cache")],
                chunked=True,
                head_only=head_only,
            )
        elif get and path == "/sleep":
            await trio.sleep(num("s", 1.0))
            await self.respond(200, b"slept\n", head_only=head_only)
        elif method == "POST" and len(parts) == 3 and parts[1] == "count":
            key = parts[2]
            self.state.counts[key] = self.state.counts.get(key, 0) + 1
            await self.respond_json({"key": key, "count": self.state.counts[key]})
        elif get and path == "/counts":
            await self.respond_json(dict(self.state.counts), head_only=head_only)
        elif get and path == "/paths":
            await self.respond_json(list(self.state.paths), head_only=head_only)
        elif get and len(parts) == 3 and parts[1] == "hold":
            await self.respond(200, self._hold(parts[2]), chunked=True, head_only=head_only)
        elif get and len(parts) == 3 and parts[1] == "events":
            await self.respond(
                200,
                self._events(parts[2], int(num("n", 3))),
                content_type="text/event-stream",
                extra=[("Cache-Control", "no-cache")],
                chunked=True,
                head_only=head_only,
            )
        elif method == "POST" and len(parts) == 3 and parts[1] == "release":
            self.state.release(parts[2])
            await self.respond_json({"released": parts[2]})
        elif len(parts) == 3 and parts[1] == "status" and parts[2].isdigit():
            status = int(parts[2])
            if not 200 <= status <= 599:
                await self.respond(400, b"status must be 200..599\n")
            elif status in (204, 304):
                await self.send(h11.Response(status_code=status, headers=[]))
                await self.send(h11.EndOfMessage())
            else:
                await self.respond(status, f"status {status}\n".encode(), head_only=head_only)
        elif get and path == "/abort":
            if "after" in query:
                n = int(num("after", 0))
                await self.send(
                    h11.Response(
                        status_code=200,
                        headers=[
                            ("Content-Type", "application/octet-stream"),
                            ("Content-Length", str(n + 1)),
                        ],
                    )
                )
                for chunk in iter_payload(n):
                    await self.send(h11.Data(data=chunk))
            raise _Abort
        else:
            await self.respond(200, target.encode("latin-1"), head_only=head_only)

    async def _events(self, key: str, count: int) -> AsyncIterator[bytes]:
        for i in range(count):
            if i:
                await self.state.release_event(f"{key}.{i - 1}").wait()
            yield f"id: {i}\ndata: event {i}\n\n".encode()

    async def _hold(self, key: str) -> AsyncIterator[bytes]:
        yield b"held\n"
        await self.state.release_event(key).wait()
        yield b"released\n"


async def _ticks(count: int, interval: float, template: str) -> AsyncIterator[bytes]:
    for i in range(count):
        if i:
            await trio.sleep(interval)
        yield template.format(i=i).encode()


def _reset(stream: trio.SocketStream) -> None:
    """Close with RST (SO_LINGER 0) instead of FIN."""
    with suppress(OSError):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def _handle_connection(state: UpstreamState, stream: trio.SocketStream) -> None:
    conn = _Conn(stream, state)
    try:
        await conn.serve()
    except _Abort:
        _reset(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; normal in tunnel tests
    except Exception:
        # An exception escaping a serve_listeners handler would take the whole server down.
        log.exception("upstream connection %d failed", conn.conn_id)


# --- servers --------------------------------------------------------------------------------------------


async def serve_upstream(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    state: UpstreamState | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. ``port = await nursery.start(serve_upstream)``; pass ``state`` to inspect it."""
    state = state if state is not None else UpstreamState()
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(functools.partial(_handle_connection, state), listeners)


@asynccontextmanager
async def open_upstream(port: int = 0, *, host: str = "127.0.0.1") -> AsyncIterator[Upstream]:
    """``async with open_upstream() as up: up.url, up.paths, up.counts, up.state.release(key)``."""
    state = UpstreamState()
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(serve_upstream, port, host=host, state=state))
            yield Upstream(bound, state)
            nursery.cancel_scope.cancel()


async def _main(host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(serve_upstream, port, host=host))
            print(f"READY {bound}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    trio.run(_main, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
