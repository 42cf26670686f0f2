"""A WSGI application (PEP 3333) run by the agent: each exchange in a worker thread, bytes through trio.

The app runs in `trio.to_thread` (at most `threads` at once, `--app-threads`); everything that touches the
tunnel stream runs back in the trio thread (`trio.from_thread.run`), so the stream keeps its one reader and one
writer. `wsgi.input` reads the request body from the stream as the app asks for it (never more than a chunk is
held), and each chunk of the response iterable, or each `write()`, waits for the stream's flow-control window:
a slow client slows the app's thread down instead of filling memory, and an endless generator streams forever.

The thread is abandoned when the exchange ends early (client gone, or 504 after `--response-timeout`): Python
cannot stop a thread, so the app finds out at its next read or write, which raise `ClientDisconnected`, and its
iterable's `close()` is still called. Its worker slot is freed only when the app returns.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Final

import trio

from ...http.bridge import READ_SIZE, bodiless
from ...http.proxyheaders import Header
from ...link.mux import StreamReset
from .handler import (
    AppRequest,
    BodyLength,
    ClientDisconnected,
    Exchange,
    HeadTimer,
    fail,
    send_head,
    timed_out,
)

__all__ = ["WsgiService"]

log = logging.getLogger("rtunnel.agent.app")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[[str, list[tuple[str, str]], ExcInfo | None], Callable[[bytes], None]]
DEFAULT_THREADS: Final = 40


class WsgiService:
    """The AppService of a WSGI app (see the module docstring)."""

    kind = "wsgi"

    def __init__(self, app: Any, *, threads: int = DEFAULT_THREADS, response_timeout: float = 60.0) -> None:
        self.app = app
        self.limiter = trio.CapacityLimiter(threads)
        self.response_timeout = response_timeout

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # WSGI has no start-up or shut-down protocol
        await trio.sleep_forever()

    async def shutdown(self) -> None:
        await trio.lowlevel.checkpoint()

    async def serve(self, exchange: Exchange, request: AppRequest) -> None:
        await _WsgiCall(self, exchange, request).run()


class _WsgiCall:
    """One exchange: the thread's side (`in_thread`, start_response, write, input) and the trio side."""

    def __init__(self, service: WsgiService, exchange: Exchange, request: AppRequest) -> None:
        self.service = service
        self.exchange = exchange
        self.request = request
        self.timer = HeadTimer(service.response_timeout)
        self.gone = False  # the exchange is over on the trio side: the thread may no longer touch the stream
        self.response: tuple[int, list[Header]] | None = None
        self.head_sent = False
        self.no_body = False
        self.length = BodyLength(())
        self.input = _Input(self)

    async def run(self) -> None:
        try:
            with self.timer.scope:
                await trio.to_thread.run_sync(
                    self.in_thread, limiter=self.service.limiter, abandon_on_cancel=True
                )
        finally:
            self.gone = True
        if self.timer.expired and not self.head_sent and not self.exchange.finished:
            await timed_out(self.exchange, self.timer.timeout)

    # -- in the worker thread ------------------------------------------------------------------------

    def in_thread(self) -> None:
        request = self.request
        try:
            result = self.service.app(environ(request, self.input), self.start_response)
            try:
                if isinstance(result, (list, tuple)):
                    # The common small response: head, body and end in one trip to the trio thread.
                    self.to_trio(self.send, b"".join(result), True)
                else:
                    for chunk in result:
                        if chunk:
                            self.to_trio(self.send, chunk, False)
                    self.to_trio(self.send, b"", True)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except ClientDisconnected:
            log.info("%s %s: the client went away", request.method, request.raw_path.decode("latin-1"))
        except Exception as exc:
            log.error(
                "%s %s: the WSGI app raised", request.method, request.raw_path.decode("latin-1"), exc_info=exc
            )
            with contextlib.suppress(ClientDisconnected):  # then there is no one left to tell
                self.to_trio(fail, self.exchange, repr(exc), head_sent=self.head_sent)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # no reference cycle through the traceback
        elif self.response is not None:
            raise AssertionError("start_response() called a second time without exc_info")
        code_text = status.split(" ", 1)[0]
        if len(code_text) != 3 or not code_text.isdigit():
            raise ValueError(f"invalid WSGI status {status!r}")
        encoded: list[Header] = []
        for name, value in headers:
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"WSGI header {name!r}: names and values must be str")
            encoded.append((name.encode("latin-1"), value.encode("latin-1")))
        self.response = (int(code_text), encoded)
        self.length = BodyLength(encoded)
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy `write()` callable start_response returns: sends at once (head first)."""
        if self.response is None:
            raise AssertionError("write() before start_response()")
        if data:
            self.to_trio(self.send, bytes(data), False)

    def to_trio(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `function` in the trio thread; ClientDisconnected once the exchange is over."""
        if self.gone:
            raise ClientDisconnected("the client went away")

        async def call() -> Any:
            if self.gone:  # checked again in the trio thread, where it changes
                raise ClientDisconnected("the client went away")
            return await function(*args, **kwargs)

        try:
            return trio.from_thread.run(call)
        except (StreamReset, trio.Cancelled, trio.RunFinishedError) as exc:
            self.gone = True
            raise ClientDisconnected(f"the client went away: {exc}") from None

    # -- in the trio thread ----------------------------------------------------------------------------

    async def send(self, data: bytes, end: bool) -> None:
        """Body bytes (the head first if not sent yet); `end`: the last of them."""
        exchange = self.exchange
        if not self.head_sent:
            if self.response is None:
                raise AssertionError("the WSGI app returned a body without calling start_response()")
            status, headers = self.response
            self.no_body = bodiless(self.exchange.method, status)
            only_head = self.no_body or (end and not data)
            if only_head and not self.no_body and self.length.declared is None:
                headers = [*headers, (b"Content-Length", b"0")]
            self._count(data, end)  # before the head: a body that contradicts it is still a 500
            self.head_sent = True
            self.timer.head_sent()
            await send_head(exchange, status, headers, end_stream=only_head)
            if only_head:
                return
        else:
            self._count(data, end)
        if not self.no_body:
            await exchange.stream.send_data(data, end_stream=end)
            exchange.finished = end

    def _count(self, data: bytes, end: bool) -> None:
        if not self.no_body:
            self.length.add(len(data))
            if end:
                self.length.check_end()

    async def receive(self) -> bytes:
        self.timer.activity()
        chunk = await self.exchange.stream.receive_data(READ_SIZE)
        self.timer.activity()
        return chunk


class _Input:
    """`wsgi.input`: the request body, read from the stream as the app asks for it."""

    def __init__(self, call: _WsgiCall) -> None:
        self._call = call
        self._buffer = b""
        self._eof = call.request.upgrade  # a protocol-switch request has no body (and its stream stays open)

    def _fill(self) -> bool:
        if self._eof:
            return False
        chunk: bytes = self._call.to_trio(self._call.receive)
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._fill():
                pass
            size = len(self._buffer)
        # Like a file: short only at the end (some frameworks take a short read for the end of the body).
        while len(self._buffer) < size and self._fill():
            pass
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def read1(self, size: int = -1) -> bytes:
        """Whatever is there, up to `size`: at most one chunk from the tunnel."""
        if not self._buffer:
            self._fill()
        size = len(self._buffer) if size < 0 else size
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        limit = sys.maxsize if size is None or size < 0 else size
        while b"\n" not in self._buffer[:limit] and len(self._buffer) < limit and self._fill():
            pass
        end = self._buffer.find(b"\n", 0, limit)
        cut = min(limit, len(self._buffer)) if end < 0 else end + 1
        line, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return line

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


class _Errors:
    """`wsgi.errors`: what the app writes there goes to the log, a line at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partial = ""

    def write(self, text: str) -> int:
        with self._lock:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
        for line in lines:
            log.error("wsgi.errors: %s", line)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self._lock:
            partial, self._partial = self._partial, ""
        if partial:
            log.error("wsgi.errors: %s", partial)


_ERRORS: Final = _Errors()


def environ(request: AppRequest, wsgi_input: _Input) -> dict[str, Any]:
    """The environ a WSGI server behind a proxy gives (PEP 3333; strings are bytes as latin-1)."""
    host, port = request.server
    env: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": request.prefix.decode("latin-1"),
        "PATH_INFO": request.path_bytes.decode("latin-1"),
        "QUERY_STRING": request.query.decode("latin-1"),
        "RAW_URI": (request.raw_path + (b"?" + request.query if request.query else b"")).decode("latin-1"),
        "SERVER_NAME": host,
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": request.client[0] if request.client else "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": request.scheme,
        "wsgi.input": wsgi_input,
        "wsgi.errors": _ERRORS,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        # The body ends where the stream ends, also without a Content-Length (a chunked upload).
        "wsgi.input_terminated": True,
    }
    if request.content_length is not None:
        env["CONTENT_LENGTH"] = str(request.content_length)
    for name, value in request.headers:
        if b"_" in name:
            # "X_User" and "X-User" would both become HTTP_X_USER: a client could pass one off as the other
            # (what a proxy in front checked, or stripped). Such names are dropped, as gunicorn and nginx do.
            continue
        key = name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if key == "CONTENT_TYPE":
                env[key] = text
            continue
        key = "HTTP_" + key
        env[key] = f"{env[key]},{text}" if key in env else text
    return env
