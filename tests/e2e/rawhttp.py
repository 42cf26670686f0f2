"""A raw-socket HTTP/1.1 client for end-to-end tests: exact bytes out, h11-parsed responses in.

httpx and curl normalize what they send (dot segments, header order, framing); tests of pipelining,
smuggling, malformed input and allowlist bypasses need the bytes on the wire to be exactly the test's.

    async with open_raw(relay.http_port) as raw:
        await raw.send(b"GET /a HTTP/1.1\\r\\nHost: x\\r\\n\\r\\nGET /b HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        first, second = await raw.response(), await raw.response()
        assert await raw.closed()   # False if the relay keeps the connection open
"""

# ASYNC109: every wait has a built-in fail_after, so a broken product fails a test instead of hanging it.
# ruff: noqa: ASYNC109

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import trio

from .procs import DEFAULT_TIMEOUT

__all__ = ["RawClient", "RawResponse", "open_raw", "request_bytes"]


@dataclasses.dataclass
class RawResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # names as on the wire
    body: bytes
    http_version: bytes = b"1.1"

    def get_all(self, name: str) -> list[bytes]:
        lname = name.lower().encode()
        return [value for key, value in self.headers if key.lower() == lname]

    def get(self, name: str) -> bytes | None:
        values = self.get_all(name)
        return values[0] if values else None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(
    method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
) -> bytes:
    """One request head (plus body) exactly as given; ``Host`` is added first unless ``headers`` has one."""
    given = list(headers or [])
    if not any(name.lower() == "host" for name, _ in given):
        given.insert(0, ("Host", "rtunnel.test"))
    lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in given)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = b""
        self._eof = False

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        if self._eof:
            raise EOFError("the relay closed the connection")
        data = await self.stream.receive_some(65536)
        if data:
            self._buffer += data
        else:
            self._eof = True

    async def interim(self, *, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Read one 1xx head (e.g. ``100 Continue``) and return its status."""
        with trio.fail_after(timeout):
            while b"\r\n\r\n" not in self._buffer:
                await self._fill()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        assert 100 <= status < 200, head
        return status

    async def response(self, method: str = "GET", *, timeout: float = DEFAULT_TIMEOUT) -> RawResponse:
        """The next final response (interim ones skipped); ``method`` tells how it is framed (HEAD)."""
        conn = h11.Connection(h11.CLIENT)
        # Only to put h11 in the state of a client that sent this request; the bytes went out already.
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        head: h11.Response | None = None
        body = bytearray()
        fed_eof = False
        with trio.fail_after(timeout):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if not self._buffer and not self._eof:
                        await self._fill()
                    if self._buffer:
                        conn.receive_data(self._buffer)
                        self._buffer = b""
                    elif self._eof:
                        if fed_eof:
                            raise EOFError("the relay closed the connection mid-response")
                        conn.receive_data(b"")  # a body delimited by the connection's close
                        fed_eof = True
                elif isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise EOFError("the relay closed the connection before a complete response")
        assert head is not None
        self._buffer = conn.trailing_data[0] + self._buffer
        return RawResponse(
            head.status_code, head.reason, list(head.headers.raw_items()), bytes(body), head.http_version
        )

    async def read_until(self, marker: bytes, *, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Everything received so far once it contains ``marker`` (left in the buffer)."""
        with trio.fail_after(timeout):
            while marker not in self._buffer:
                await self._fill()
        return self._buffer

    async def read_at_least(self, n: int, *, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Everything received so far once it is at least ``n`` bytes (left in the buffer)."""
        with trio.fail_after(timeout):
            while len(self._buffer) < n:
                await self._fill()
        return self._buffer

    async def closed(self, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """True once the relay closed the connection with nothing more sent; False if bytes arrive instead."""
        with trio.fail_after(timeout):
            while not self._eof and not self._buffer:
                try:
                    await self._fill()
                except trio.BrokenResourceError:
                    return True  # a reset counts as closed
        return self._eof and not self._buffer


@asynccontextmanager
async def open_raw(port: int, host: str = "127.0.0.1") -> AsyncIterator[RawClient]:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        yield RawClient(stream)
