"""An ASGI 3 application run by the agent on its own trio loop: `http` and `websocket` scopes, `lifespan`.

Apps built on anyio (Starlette, FastAPI) run on trio as they are. An app that needs asyncio itself fails at
its first asyncio call; when that happens during lifespan start-up the agent stops with one line saying so
(`StartupError`), since hosting asyncio beside trio (trio-asyncio) would put a second event loop and its
latency in every exchange.

Each exchange's app call runs in the service's own nursery, not in the exchange's task: when the client goes
away the exchange is cancelled at once, but the app is not; its `receive()` returns `http.disconnect` (or
`websocket.disconnect`), its `send()` raises `ClientDisconnected` (an OSError, as ASGI 2.4 asks), and it has
DISCONNECT_GRACE seconds to return before it is cancelled. Request bodies are read from the tunnel stream as
the app asks (never more than a chunk at a time), and each response body message waits for the stream's
flow-control window.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import trio

from ...http.bridge import READ_SIZE, bodiless
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
from .lifespan import Lifespan, StartupError, needs_asyncio

__all__ = ["DISCONNECT_GRACE", "AsgiService", "StartupError", "asgi_headers", "base_scope"]

log = logging.getLogger("rtunnel.agent.app")

# How long an app may go on after its client went away (it sees http.disconnect) before it is cancelled.
DISCONNECT_GRACE: Final = 5.0
ASGI: Final = {"version": "3.0", "spec_version": "2.4"}

Message = dict[str, Any]


class AsgiService:
    """The AppService of an ASGI 3 app (see the module docstring)."""

    kind = "asgi"

    def __init__(self, app: Any, *, lifespan: str = "auto", response_timeout: float = 60.0) -> None:
        self.app = app
        self.response_timeout = response_timeout
        self.state: dict[str, Any] = {}
        self.lifespan = Lifespan(app, lifespan, self.state)
        self._nursery: trio.Nursery | None = None
        self._tasks_scope = trio.CancelScope(shield=True)
        self._stopped = trio.Event()
        self._stopping = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Lifespan start-up, then host the app's calls until cancelled; shutdown() (also run when cancelled,
        shielded and bounded) sends lifespan.shutdown and then cancels any call still running."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._host)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self.shutdown()

    async def _host(self, *, task_status: trio.TaskStatus[None]) -> None:
        # Shielded: cancelling the agent must not cancel the app's lifespan before its shutdown has run.
        with self._tasks_scope:
            async with trio.open_nursery() as nursery:
                await self.lifespan.startup(nursery)
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()

    async def shutdown(self) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await self.lifespan.shutdown()
        finally:
            self._tasks_scope.cancel()
            self._stopped.set()

    async def serve(self, exchange: Exchange, request: AppRequest) -> None:
        from .websocket import WebSocketCall

        call: _HttpCall | WebSocketCall
        if request.method == "GET" and b"websocket" in request.upgrade_to:
            call = WebSocketCall(self, exchange, request)
        else:
            call = _HttpCall(self, exchange, request)
        if self._nursery is None or self._stopping:
            await exchange.reply_error(503, "rtunnel agent: the application is shutting down\n")
            return
        done = trio.Event()
        self._nursery.start_soon(self._run_call, call, done)
        try:
            await done.wait()
        finally:
            if not done.is_set():  # the exchange was cancelled: the client went away, or the agent stops
                call.disconnect()
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(DISCONNECT_GRACE):
                        await done.wait()
                    call.scope.cancel()
                    with trio.move_on_after(1.0):
                        await done.wait()

    async def _run_call(self, call: _HttpCall | Any, done: trio.Event) -> None:
        try:
            with call.scope:
                await call.run()
        except Exception:  # a bug of ours: this exchange fails, the service and the other exchanges go on
            log.exception("internal error serving the app")
        finally:
            done.set()


def base_scope(service: AsgiService, request: AppRequest, kind: str) -> dict[str, Any]:
    return {
        "type": kind,
        "asgi": ASGI,
        "http_version": "1.1",
        "scheme": request.scheme if kind == "http" else ("wss" if request.scheme == "https" else "ws"),
        "path": request.path_bytes.decode("utf-8", "replace"),
        "raw_path": request.raw_path,
        "query_string": request.query,
        "root_path": request.root_path,
        "headers": asgi_headers(request),
        "client": request.client,
        "server": request.server,
        "state": dict(service.state),
    }


def asgi_headers(request: AppRequest) -> list[tuple[bytes, bytes]]:
    return [(name.lower(), value) for name, value in request.headers]


class _HttpCall:
    """One `http` scope call: receive() and send() over the exchange's stream."""

    def __init__(self, service: AsgiService, exchange: Exchange, request: AppRequest) -> None:
        self.service = service
        self.exchange = exchange
        self.request = request
        self.scope = trio.CancelScope()
        self.timer = HeadTimer(service.response_timeout)
        self.body_done = False  # the last http.request went to the app
        self.over = trio.Event()  # the response is complete or the client is gone
        self.disconnected = False
        self.start: Message | None = None
        self.head_sent = False
        self.no_body = False
        self.trailers = False
        self.trailer_headers: list[tuple[bytes, bytes]] = []
        self.body_ended = False
        self.complete = False
        self.length = BodyLength(())

    def disconnect(self) -> None:
        self.disconnected = True
        self.over.set()

    async def run(self) -> None:
        scope = base_scope(self.service, self.request, "http")
        scope["method"] = self.request.method
        scope["extensions"] = {"http.response.trailers": {}}
        what = f"{self.request.method} {self.request.raw_path.decode('latin-1')}"
        try:
            with self.timer.scope:
                await self.service.app(scope, self.receive, self.send)
        except Exception as exc:
            if isinstance(exc, ClientDisconnected) and self.disconnected:
                log.info("%s: the client went away", what)
                return
            hint = " (it needs asyncio: serve it with uvicorn and --upstream)" if needs_asyncio(exc) else ""
            log.error("%s: the ASGI app raised%s", what, hint, exc_info=exc)
            await fail(self.exchange, repr(exc), head_sent=self.head_sent)
            return
        if self.complete or self.disconnected or self.exchange.finished:
            return
        if self.timer.expired and self.start is None:
            await timed_out(self.exchange, self.timer.timeout)
            return
        if self.timer.expired:
            self.exchange.note = "app timeout"
        reason = "returned without a response" if self.start is None else "returned mid-response"
        log.error("%s: the ASGI app %s", what, reason)
        await fail(self.exchange, reason, head_sent=self.head_sent)

    async def receive(self) -> Message:
        if not self.body_done and not self.disconnected:
            self.timer.activity()
            stream = self.exchange.stream
            try:
                # A protocol-switch request has no body, but its stream stays open for the switched protocol.
                chunk = b"" if self.request.upgrade else await stream.receive_data(READ_SIZE)
            except StreamReset:  # the client is gone
                self.disconnect()
                return {"type": "http.disconnect"}
            self.timer.activity()
            self.body_done = not chunk or stream.at_eof
            return {"type": "http.request", "body": chunk, "more_body": not self.body_done}
        await self.over.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.disconnected:
            raise ClientDisconnected("the client went away")
        kind = message["type"]
        try:
            if kind == "http.response.start":
                self._start(message)
            elif kind == "http.response.body":
                await self._body(message)
            elif kind == "http.response.trailers":
                await self._trailers(message)
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} in an http scope")
        except StreamReset as exc:  # reset by the relay, or the link went down
            self.disconnect()
            raise ClientDisconnected(f"the client went away: {exc}") from None

    def _start(self, message: Message) -> None:
        if self.start is not None:
            raise RuntimeError("http.response.start sent twice")
        status = int(message["status"])
        headers = [(bytes(name), bytes(value)) for name, value in message.get("headers", ())]
        self.start = {"status": status, "headers": headers}
        self.no_body = bodiless(self.exchange.method, status)
        self.trailers = bool(message.get("trailers", False))
        self.length = BodyLength(headers)
        self.timer.head_sent()  # the app answered in time; its head goes out with the first body bytes

    async def _body(self, message: Message) -> None:
        if self.start is None:
            raise RuntimeError("http.response.body before http.response.start")
        if self.body_ended:
            raise RuntimeError("http.response.body after the body ended")
        body = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        end_stream = not more and not self.trailers
        stream = self.exchange.stream
        if not self.no_body:
            self.length.add(len(body))
            if not more:
                self.length.check_end()
        if not self.head_sent:
            self.head_sent = True
            head_only = self.no_body or (end_stream and not body)
            await send_head(self.exchange, self.start["status"], self.start["headers"], end_stream=head_only)
            if head_only and end_stream:
                self._completed()
                return
        if not more:
            self.body_ended = True
        if self.no_body:
            if end_stream:
                self._completed()
            return
        if body or end_stream:
            await stream.send_data(body, end_stream=end_stream)
        if end_stream:
            self._completed()

    async def _trailers(self, message: Message) -> None:
        if not self.trailers or not self.body_ended:
            raise RuntimeError("http.response.trailers without trailers=True, or before the body ended")
        self.trailer_headers += [(bytes(n), bytes(v)) for n, v in message.get("headers", ())]
        if message.get("more_trailers", False):
            return
        if self.no_body:
            self._completed()
            return
        if self.trailer_headers:
            await self.exchange.stream.send_trailers(self.trailer_headers)
        else:
            await self.exchange.stream.send_end()
        self._completed()

    def _completed(self) -> None:
        self.complete = True
        self.exchange.finished = True
        self.over.set()
