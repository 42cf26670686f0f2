"""The agent side of one HTTP exchange: a tunnel stream in, an upstream HTTP/1.1 request out (SPEC.md 5.4).

`ExchangeHandler` is the mux's handler for every stream the relay opens. Per stream an `Exchange` prepares
the request (rtunnel.agent.prepare: the allowlist, checked here since the relay is not trusted to have done
so, and the header rules; no I/O), then forwards exactly the normalized target and streams the request body
to the upstream while it streams the response back (rtunnel.agent.attempt, which maps every upstream failure
to a status the client can act on), or hands the request to an in-process app (rtunnel.agent.apps).

A protocol switch (SPEC.md 5.5: `Connection: upgrade` + `Upgrade`, no body) is forwarded with its Upgrade
header; if the upstream answers 101, the stream and the upstream connection carry raw bytes both ways
(rtunnel.http.passthrough) until both sides have closed, and the connection is never pooled again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from protocol import ErrorCode, LocalProtocolError, RequestHead, ResponseHead

from ..http.proxyheaders import Header
from ..http.replies import phrase, plain_text
from ..link.mux import MuxStream, StreamReset
from ..ops.inspector import Capture, Inspector
from ..ops.logs import Access, AccessLog, request_id_of
from .allowlist import Allowlist
from .attempt import RequestBody, forward
from .prepare import Refusal, log_path, prepare, upstream_request
from .upstream import UpstreamPool, parse_upstream_url

__all__ = ["Exchange", "ExchangeHandler"]

log = logging.getLogger("rtunnel.agent")
access_log = AccessLog("rtunnel.agent.access")


class Exchange:
    """State of one stream's exchange, shared by its tasks; also what the access log reports."""

    def __init__(self, handler: ExchangeHandler, stream: MuxStream, head: RequestHead) -> None:
        self.handler = handler
        self.stream = stream
        self.head = head
        self.method = head.method
        self.log_path = log_path(head.target)
        self.status: int | None = None
        self.note = ""
        self.reason = ""  # the text of a response the agent made itself (the dashboard's refusals)
        self.relay_reset: StreamReset | None = None
        self.finished = False  # our direction is complete or we reset it ourselves
        self.upgrade = False  # a protocol-switch request (SPEC 5.5), forwarded with its Upgrade header

    async def run(self) -> None:
        handler = self.handler
        prepared = prepare(self.head, handler.allowlist, handler.default_host)
        self.log_path = prepared.log_path
        if isinstance(prepared, Refusal):
            await self.refuse(prepared)
            return
        self.upgrade = prepared.upgrade
        if handler.app_call is not None:  # an in-process app (rtunnel.agent.apps) takes it from here
            await handler.app_call(self, prepared.target, prepared.headers, prepared.content_length)
            return
        has_body = prepared.has_body(self.stream.at_eof)
        body = None
        if has_body is not False:
            body = RequestBody(self.stream, prepared.content_length)
            if has_body is None:
                has_body = bool(await body.read(0))
        request = upstream_request(self.method, prepared, has_body)
        if isinstance(request, Refusal):
            await self.refuse(request)
            return
        await forward(self, request, body if has_body else None)

    # -- replies to the relay ------------------------------------------------------------------------

    async def refuse(self, refusal: Refusal) -> None:
        self.note = refusal.note
        await self.reply_error(refusal.status, refusal.text)

    async def send_head(self, head: ResponseHead) -> None:
        """An interim head; one the tunnel cannot carry is dropped (interim heads are advisory)."""
        try:
            await self.stream.send_reply(head)
        except LocalProtocolError as exc:
            log.info("dropped an interim %d response: %s", head.status, exc)

    async def reply_error(self, status: int, text: str) -> None:
        """A complete response made by the agent (text/plain), e.g. 403 or 502."""
        self.reason = text.strip()
        body, headers = plain_text(text)
        head = ResponseHead(status, phrase(status), (*headers, (b"Cache-Control", b"no-store")))
        self.status = status
        await self.stream.send_reply(head, data=b"" if self.method == b"HEAD" else body, end_stream=True)
        self.finished = True

    def reset(self, code: ErrorCode) -> None:
        self.finished = True
        self.stream.reset(code)


class ExchangeHandler:
    """The agent's handler for the streams the relay opens: one per agent process, shared by its links.

    `upstream_url` is ``http://host:port``. `response_timeout` bounds the wait for the response head after
    the request was sent, and any single stall while sending the request body. Start `run()` in a nursery
    to close idle connections on time; call `aclose()` at shutdown.
    """

    # Set by rtunnel.agent.apps.handler.AppExchangeHandler: an app run in-process takes each request that passed the
    # checks, instead of an upstream connection.
    app_call: Callable[[Exchange, bytes, list[Header], int | None], Awaitable[None]] | None = None

    def __init__(
        self,
        upstream_url: str,
        allowlist: Allowlist,
        *,
        connect_timeout: float = 10,
        response_timeout: float = 60,
        max_idle_connections: int = 32,
        idle_timeout: float = 30,
    ) -> None:
        self.address = parse_upstream_url(upstream_url)
        self.default_host = self.address.authority  # the Host of a request that has none
        self.allowlist = allowlist
        self.response_timeout = response_timeout
        self.on_exchange: Callable[[Access], None] | None = None  # each exchange's access record (metrics)
        self.inspector: Inspector | None = None  # --inspect: record each exchange (the one hook, __call__)
        self.pool = UpstreamPool(
            self.address,
            connect_timeout=connect_timeout,
            max_idle=max_idle_connections,
            idle_timeout=idle_timeout,
        )

    async def __call__(self, stream: MuxStream) -> None:
        head = stream.request_head
        if head is None:
            stream.reset(ErrorCode.PROTOCOL_ERROR)
            return
        started = trio.current_time()
        capture: Capture | None = None
        if self.inspector is not None:
            capture = self.inspector.begin(
                "agent", head.method, head.target, head.headers, request_id=request_id_of(head.headers)
            )
            stream = capture.tap(stream, stream.peer_name)
        exchange = Exchange(self, stream, head)
        try:
            # The relay may abandon the stream while we wait on the upstream: cancel at once whatever we wait on.
            with trio.CancelScope() as scope:
                stream.cancel_on_reset(scope)
                try:
                    await exchange.run()
                except StreamReset as exc:
                    if exchange.relay_reset is None:
                        exchange.relay_reset = exc
            if scope.cancelled_caught and not exchange.finished and exchange.relay_reset is None:
                exchange.relay_reset = stream.error
        finally:
            access = self._log(exchange, stream, started)
            if capture is not None:
                capture.finish(access)

    def _log(self, exchange: Exchange, stream: MuxStream, started: float) -> Access:
        note = exchange.note
        if exchange.relay_reset is not None:
            note = str(exchange.relay_reset)  # "stream reset (peer, CANCEL)", or the link's end
        elif not exchange.finished and not note:
            note = "cancelled"
        access = Access(
            method=exchange.method.decode("latin-1"),
            path=exchange.log_path,
            status=exchange.status,
            bytes_in=stream.bytes_received,
            bytes_out=stream.bytes_sent,
            duration_ms=round((trio.current_time() - started) * 1000, 3),
            # Set by the relay; sanitized: not trusted. Only the log shows it.
            request_id=request_id_of(exchange.head.headers) if (logged := access_log.enabled) else None,
            note=f"{note}: {exchange.reason}" if exchange.reason else note or None,
        )
        if logged:
            access_log.write(
                f"{access.method} {access.path} {access.status if access.status is not None else '-'} "
                f"in={access.bytes_in:d} out={access.bytes_out:d} {round(access.duration_ms):d}ms "
                f"id={access.request_id or '-'}{f' ({note})' if note else ''}",
                access,
                "note",
                note or None,
            )
        if self.on_exchange is not None:
            self.on_exchange(access)
        return access

    async def run(self) -> None:
        """Close idle upstream connections as they expire; runs until cancelled."""
        await self.pool.run()

    async def aclose(self) -> None:
        """Close the pooled connections (those in use close when their exchange ends)."""
        self.pool.close()
        await trio.lowlevel.checkpoint()
